"""The benchmark harness ``mtp bench`` (``mtp_torch.bench``, ``mtp_torch.cli.bench``).

End to end on a tiny random Llama checkpoint with a tiny offline word-level tokenizer; the
metrics (GSM8K answer extraction, token F1, common prefix) as pure functions.  No timing asserts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch.bench.config import BenchConfig
from mtp_torch.bench.methods import GreedyGenerate, bench_methods
from mtp_torch.bench.output import format_markdown
from mtp_torch.bench.prompts import BenchPrompt, load_prompts
from mtp_torch.bench.quality import (
    answers_match,
    common_prefix_length,
    extract_final_number,
    gsm8k_reference,
    token_f1,
)
from mtp_torch.bench.runner import run_benchmark
from tests.synthetic import tiny_llama

WORDS = (
    "how many apples does she have left ? there are 3 5 12 7 a the is answer "
    "tom buys 2 bags of each with eggs sells for $ dollars total"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<user> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<bot> {% endif %}"
)


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<user>", "<bot>"]
    vocab = {token: index for index, token in enumerate([*specials, *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny checkpoint directory (mask token stored in its config)."""

    from mtp_torch.decoding.model import MTPModel

    tokenizer = _tokenizer()
    model = tiny_llama(
        len(tokenizer),
        hidden_size=32,
        max_positions=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    ).eval()
    mtp = MTPModel(model, tokenizer=tokenizer)
    return mtp.save_pretrained(
        tmp_path_factory.mktemp("bench") / "tiny-mtp", k_max=4, threshold=0.9
    )


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-data") / "tiny.jsonl"
    rows = [
        {
            "question": "how many apples does she have left ?",
            "answer": "she has 12 - 5 = 7\n#### 7",
        },
        {"question": "tom buys 2 bags of 5 apples each . how many apples ?", "answer": "#### 10"},
        {"question": "there are 3 eggs", "answer": "#### 3"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- end to end --------------------------------------------------------------------------------


def test_mtp_bench_end_to_end(checkpoint: Path, data_file: Path, tmp_path: Path) -> None:
    from mtp_torch.cli.bench import main

    out = tmp_path / "report.json"
    plot = tmp_path / "plot.png"
    status = main(
        [
            "--model",
            str(checkpoint),
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--plot",
            str(plot),
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "10",
            "--k-max",
            "2,4",
            "--thresholds",
            "0.9,0.3",
            "--static",
            "2",
            "--verify-thresholds",
            "0.3",
            "--prompt-lookup-tokens",
            "3",
            "--cost-max-tokens",
            "4",
            "--cost-repeats",
            "1",
            "--kernel",
            "stock",
            "--verify-static",
            "",
            "--dtype",
            "float64",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert status == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text(encoding="utf-8"))

    meta = report["meta"]
    for key in ("machine", "torch", "transformers", "date", "command", "model", "max_new_tokens"):
        assert key in meta
    assert meta["num_prompts"] == 2 and meta["max_new_tokens"] == 10
    # The CPU and the ISA flags its figures depend on travel with them.
    from mtp_torch.decoding.native import cpu_isa, cpu_model

    machine = meta["machine"]
    assert machine["cpu"] == cpu_model() and machine["isa"] == " ".join(cpu_isa())
    assert "load_average_at_start" in machine
    assert report["cost_curve"]["num_tokens"] == [1, 2, 3, 4]

    rows = {row["name"]: row for row in report["methods"]}
    assert list(rows) == [
        "greedy",
        "prompt_lookup",
        "static_1",
        "static_2",
        "confadapt_0.9_k2",
        "confadapt_0.9_k4",
        "confadapt_0.3_k2",
        "confadapt_0.3_k4",
        "verify_confadapt_0.3_k2",
        "verify_confadapt_0.3_k4",
    ]
    fields = (
        "tokens_per_forward",
        "tokens_per_second",
        "speedup",
        "speedup_vs_fp32_greedy",
        "speedup_ceiling",
        "accuracy",
        "teacher_nll",
        "agreement_prefix",
        "token_f1",
        "exact_match",
        "peak_memory_mb",
    )
    for row in rows.values():
        for field in fields:
            assert row[field] is not None, (row["name"], field)
        assert row["generated_tokens"] > 0
        assert row["peak_memory_mb"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0 and row["num_graded"] == 2
        assert row["teacher_nll"] >= 0.0

    greedy = rows["greedy"]
    assert greedy["speedup"] == 1.0
    assert greedy["tokens_per_forward"] == 1.0
    assert greedy["exact_match"] == 1.0 and greedy["token_f1"] == 1.0
    # The lossless mode reproduces greedy token for token.
    for name in ("verify_confadapt_0.3_k2", "verify_confadapt_0.3_k4"):
        assert rows[name]["exact_match"] == 1.0
        assert rows[name]["token_f1"] == 1.0
        assert rows[name]["agreement_prefix"] == greedy["agreement_prefix"]
        assert rows[name]["teacher_nll"] == pytest.approx(greedy["teacher_nll"])
    # Static k = 2 emits two tokens per pass (except possibly the last step of a prompt).
    assert rows["static_2"]["tokens_per_forward"] > 1.0
    assert rows["static_2"]["policy"] == "StaticK(2)"
    assert rows["confadapt_0.3_k4"]["policy"] == "ConfAdapt(threshold=0.3, k_max=4)"
    assert (
        sum(rows["confadapt_0.3_k4"]["accepted_histogram"])
        == rows["confadapt_0.3_k4"]["forward_passes"]
    )
    # Three interleaved rounds; every ratio is a median with its per-round range.
    assert meta["repeats"] == 3
    for row in rows.values():
        assert len(row["seconds_per_repeat"]) == 3
        low, high = row["speedup_spread"]
        assert low <= row["speedup"] <= high
    assert rows["static_1"]["speedup_vs_static1"] == 1.0  # the reference itself
    assert rows["static_2"]["speedup_vs_static1"] is not None
    best = report["summary"]["mtp_speedup_same_precision"]
    assert best is None or (
        best["name"] in rows and best["tokens_per_forward"] >= 1.05 and "within_noise" in best
    )
    lossless = report["summary"]["lossless_speedup_same_precision"]
    assert lossless is None or lossless["name"].startswith("verify_")
    assert {choice["threshold"] for choice in report["k_max_choice"]} == {0.9, 0.3}


def test_bench_int8_and_auto_rows_are_labelled_apart(checkpoint: Path, data_file: Path) -> None:
    from mtp_torch.decoding.model import MTPModel

    mtp = MTPModel.from_pretrained(checkpoint, dtype=torch.float32)
    prompts = load_prompts(data_file, mtp.tokenizer, num_prompts=1)
    config = BenchConfig(
        max_new_tokens=6,
        k_max=(2, "auto"),
        thresholds=(0.5,),
        static=(),
        verify_thresholds=(),
        quantize="int8",
        prompt_lookup_tokens=None,
        cost_max_tokens=4,
        cost_repeats=1,
        auto_candidates=(1, 2),
        probe_prompts=1,
        probe_tokens=4,
    )
    messages: list[str] = []
    typed = run_benchmark(mtp, prompts, config, log=messages.append)
    report = typed.to_dict()  # the JSON that `mtp bench --out` writes
    rows = {row["name"]: row for row in report["methods"]}
    assert set(rows) == {
        "greedy",
        "static_1",
        "confadapt_0.5_k2",
        "confadapt_0.5_kauto",
        "greedy_int8",
        "static_1_int8",
        "confadapt_0.5_k2_int8",
        "confadapt_0.5_kauto_int8",
    }
    assert rows["greedy"]["precision"] == "float32"
    assert rows["greedy_int8"]["precision"] == "int8"
    assert rows["greedy_int8"]["speedup"] == 1.0  # against its own precision
    assert rows["greedy_int8"]["speedup_vs_fp32_greedy"] is not None
    assert "token_f1_same_precision" in rows["confadapt_0.5_k2_int8"]
    assert "token_f1_same_precision" not in rows["confadapt_0.5_k2"]
    auto = rows["confadapt_0.5_kauto"]
    assert auto["k_max_auto"] is True and auto["k_max"] in (1, 2)
    assert auto["policy"] in ("StaticK(1)", "ConfAdapt(threshold=0.5, k_max=2)")
    best = report["summary"]["mtp_speedup_same_precision"]
    assert best is None or not best["name"].endswith("_int8")
    assert any("k_max=auto" in message for message in messages)
    table = format_markdown(typed)
    assert table.count("\n| ") >= len(rows) and "greedy_int8" in table
    assert f"- Machine: {report['meta']['machine']['cpu']}, " in table
    assert format_markdown(report) == table  # the JSON form formats the same
    assert typed.row("greedy_int8").speedup == 1.0
    # The fp32 model was not touched by quantisation.
    assert next(mtp.model.parameters()).dtype == torch.float32
    assert all(
        type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32
        for m in mtp.model.modules()
    )


def test_cli_dispatcher_runs_bench(checkpoint: Path, data_file: Path, tmp_path: Path) -> None:
    from mtp_torch.cli.app import main

    out = tmp_path / "r.json"
    status = main(
        [
            "bench",
            "--model",
            str(checkpoint),
            "--data",
            str(data_file),
            "--out",
            str(out),
            "--no-plot",
            "--num-prompts",
            "1",
            "--max-new-tokens",
            "4",
            "--k-max",
            "2",
            "--thresholds",
            "0.9",
            "--static",
            "",
            "--verify-thresholds",
            "",
            "--verify-static",
            "",
            "--prompt-lookup-tokens",
            "0",
            "--no-cost-curve",
            "--kernel",
            "stock",
            "--quiet",
        ]
    )
    assert status == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [row["name"] for row in report["methods"]] == ["greedy", "static_1", "confadapt_0.9_k2"]
    assert report["meta"]["repeats"] == 3
    assert report["meta"]["data"] == str(data_file)  # a given file is named as given
    assert report["cost_curve"] is None
    assert report["methods"][0]["speedup_ceiling"] is None


def test_cli_bench_skinny_kernel_rows(checkpoint: Path, data_file: Path, tmp_path: Path) -> None:
    """--kernel skinny: stock greedy and static_1, then every method with the kernel."""
    from mtp_torch.cli.app import main

    out = tmp_path / "r.json"
    args = ["bench", "--model", str(checkpoint), "--data", str(data_file), "--out", str(out)]
    args += ["--num-prompts", "1", "--max-new-tokens", "5", "--k-max", "2", "--thresholds", "0.5"]
    args += ["--static", "1", "--verify-thresholds", "0.5", "--prompt-lookup-tokens", "2"]
    args += ["--no-cost-curve", "--quiet", "--kernel", "skinny", "--verify-static", ""]
    assert main(args) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["name"]: row for row in report["methods"]}
    stock = ["greedy", "prompt_lookup", "static_1"]
    skinny = ["greedy_skinny", "static_1_skinny", "confadapt_0.5_k2_skinny"]
    assert list(rows) == [*stock, *skinny, "verify_confadapt_0.5_k2_skinny"]
    assert report["meta"]["kernel_plan"] == "skinny: 1-6 skinny"
    assert rows["greedy_skinny"]["precision"] == "float32 skinny"
    assert rows["greedy_skinny"]["speedup"] == 1.0  # against greedy of its own kernel
    # The kernel changes sums only to rounding: the same tokens as the stock rows.
    for name in ("greedy", "static_1"):
        assert rows[f"{name}_skinny"]["generated_tokens"] == rows[name]["generated_tokens"]
        assert rows[f"{name}_skinny"]["token_f1_same_precision"] == rows[name]["token_f1"]
    assert rows["verify_confadapt_0.5_k2_skinny"]["token_f1"] == 1.0  # lossless, same kernel
    # MTP rows are measured against static_1 of the same kernel.
    assert rows["confadapt_0.5_k2_skinny"]["speedup_vs_static1"] is not None
    assert out.with_suffix(".png").is_file()  # the plot draws the skinny rows apart


def test_cli_bench_packed_kernel_rows(
    checkpoint: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--packed: the kernel rows read packed weights (the report's plan says so; outputs
    unchanged), and it needs the compiled kernel."""
    from mtp_torch.cli.app import main

    out = tmp_path / "r.json"
    args = ["bench", "--model", str(checkpoint), "--data", str(data_file), "--out", str(out)]
    args += ["--num-prompts", "1", "--max-new-tokens", "5", "--k-max", "2", "--thresholds", "0.5"]
    args += ["--static", "", "--verify-thresholds", "", "--prompt-lookup-tokens", "0", "--no-plot"]
    args += ["--no-cost-curve", "--quiet", "--repeats", "1", "--verify-static", "2"]
    assert main([*args, "--kernel", "stock", "--packed"]) != 0
    assert "--packed needs the compiled kernel" in capsys.readouterr().err
    assert main([*args, "--kernel", "native", "--packed"]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["meta"]["kernel_plan"].endswith(", packed weights")
    rows = {row["name"]: row for row in report["methods"]}
    assert rows["static_1_native"]["generated_tokens"] == rows["static_1"]["generated_tokens"]
    assert rows["verify_static_2_native"]["token_f1"] == 1.0


def test_cli_bench_names_the_bundled_prompts_package_relative(
    checkpoint: Path, tmp_path: Path
) -> None:
    from mtp_torch.cli.app import main

    out = tmp_path / "r.json"
    args = ["bench", "--model", str(checkpoint), "--out", str(out), "--no-plot", "--quiet"]
    args += ["--num-prompts", "1", "--max-new-tokens", "2", "--k-max", "2", "--thresholds", "0.9"]
    args += ["--static", "", "--verify-thresholds", "", "--prompt-lookup-tokens", "0"]
    assert main([*args, "--no-cost-curve", "--kernel", "stock", "--repeats", "1"]) == 0
    meta = json.loads(out.read_text(encoding="utf-8"))["meta"]
    assert meta["data"] == "<package>/mtp_torch/data/bench_prompts.jsonl"


def test_cli_bench_kernel_is_cpu_only(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mtp_torch.cli.app import main

    main(["bench", "--model", str(checkpoint), "--device", "meta", "--kernel", "skinny"])
    assert "--kernel skinny is a CPU kernel: on meta every method runs stock" in (
        capsys.readouterr().err
    )


def test_cli_reports_missing_data(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtp_torch.cli.bench import main

    status = main(["--model", str(checkpoint), "--data", str(tmp_path / "nope.jsonl"), "--quiet"])
    assert status == 2
    assert "does not exist" in capsys.readouterr().err


# --- prompts -----------------------------------------------------------------------------------


def test_load_prompts_fields_and_chat_template(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"question": "how many apples ?", "answer": "x\\n#### 1,200"}\n'
        "\n"
        '{"prompt": "tom buys eggs"}\n'
        '{"text": "the answer is"}\n',
        encoding="utf-8",
    )
    prompts = load_prompts(path, tokenizer)
    assert [p.reference_answer for p in prompts] == ["1200", None, None]
    user, bot = tokenizer.convert_tokens_to_ids(["<user>", "<bot>"])
    assert prompts[0].input_ids[0] == user and prompts[0].input_ids[-1] == bot
    assert prompts[1].input_ids[0] == user
    assert user not in prompts[2].input_ids  # raw text: no chat template
    assert len(load_prompts(path, tokenizer, num_prompts=2)) == 2
    no_chat = load_prompts(path, tokenizer, chat=False)
    assert user not in no_chat[0].input_ids


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"answer": "#### 3"}\n', "no 'question'"),
        ("[1, 2]\n", "JSON object"),
        ("{oops\n", "JSON"),
        ("\n", "no prompt"),
    ],
)
def test_load_prompts_rejects_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_prompts(path, _tokenizer())


# --- methods and config ------------------------------------------------------------------------


def test_bench_methods_names_and_policies() -> None:
    specs = bench_methods(k_max=(4, 16), thresholds=(0.9,), static=(2, 3), verify_thresholds=(0.9,))
    assert [s.name for s in specs] == [
        "greedy",
        "prompt_lookup",
        "static_2",
        "static_3",
        "confadapt_0.9_k4",
        "confadapt_0.9_k16",
        "verify_confadapt_0.9_k4",
        "verify_confadapt_0.9_k16",
    ]
    by_name = {s.name: s.describe() for s in specs}
    assert by_name["static_3"].policy == StaticK(3)
    assert by_name["verify_confadapt_0.9_k16"].policy == ConfAdapt(0.9, 16)
    assert by_name["verify_confadapt_0.9_k16"].verify
    assert by_name["greedy"].policy is None and isinstance(specs[0], GreedyGenerate)
    int8 = bench_methods(
        k_max=(4,), thresholds=(0.9,), static=(), verify_thresholds=(), precision="int8"
    )
    assert [s.name for s in int8] == ["greedy_int8", "prompt_lookup_int8", "confadapt_0.9_k4_int8"]


def test_bench_methods_auto_needs_a_resolved_policy() -> None:
    with pytest.raises(ValueError, match="auto_policy"):
        bench_methods(k_max=("auto",), thresholds=(0.9,))
    specs = bench_methods(
        k_max=("auto",),
        thresholds=(0.9,),
        static=(),
        verify_thresholds=(),
        auto_policies={0.9: StaticK(1)},
        prompt_lookup_tokens=None,
    )
    assert specs[-1].name == "confadapt_0.9_kauto" and specs[-1].describe().k_max == 1


def test_bench_methods_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        bench_methods(k_max=(4, 4), thresholds=(0.9,))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"repeats": 0},
        {"k_max": (0,)},
        {"k_max": ("big",)},
        {"thresholds": (1.5,)},
        {"verify_thresholds": (0.0,)},
        {"static": (0,)},
        {"quantize": "int4"},
        {"kernel": "fast"},
        {"prompt_lookup_tokens": 0},
    ],
)
def test_bench_config_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)


def test_run_benchmark_rejects_no_prompts() -> None:
    with pytest.raises(ValueError, match="no prompts"):
        run_benchmark(object(), [])


def test_bench_prompt_converts_ids() -> None:
    assert BenchPrompt(text="x", input_ids=[1, 2]).input_ids == (1, 2)


# --- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet sells 9 eggs.\n#### 18", "18"),
        ("#### $1,234.00", "1234"),
        ("So the total is \\boxed{42}.", "42"),
        ("\\boxed{3} and later \\boxed{-7.50}", "-7.5"),
        ("The answer is 15 dollars, not 20.", "15"),
        ("Final answer: $2,500.", "2500"),
        ("She has 3 apples and buys 4 more, so 3 + 4 = 7.", "7"),
        ("It costs 0.5 each, total .25", "0.25"),
        ("Temperature dropped to -4 degrees.", "-4"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_number(text: str, expected: str | None) -> None:
    assert extract_final_number(text) == expected


def test_gsm8k_reference() -> None:
    assert gsm8k_reference("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 18") == "18"
    assert gsm8k_reference("#### 1,000") == "1000"
    assert gsm8k_reference("42") == "42"
    assert gsm8k_reference(7) == "7"
    assert gsm8k_reference(2.5) == "2.5"
    assert gsm8k_reference("no marker") is None
    assert gsm8k_reference(None) is None
    assert gsm8k_reference(True) is None


def test_answers_match() -> None:
    assert answers_match("18", "18")
    assert answers_match("18.0", "18")
    assert not answers_match("17", "18")
    assert not answers_match(None, "18")


def test_common_prefix_and_f1_examples() -> None:
    assert common_prefix_length([1, 2, 3, 9], [1, 2, 3, 4, 5]) == 3
    assert common_prefix_length([], [1]) == 0
    assert token_f1([1, 2, 2, 3], [2, 1, 4, 2]) == pytest.approx(0.75)
    assert token_f1([], []) == 1.0
    assert token_f1([1], []) == 0.0
    assert token_f1([1, 1], [2, 2]) == 0.0


token_lists = st.lists(st.integers(min_value=0, max_value=6), max_size=12)


@given(token_lists, token_lists)
def test_metric_properties(a: list[int], b: list[int]) -> None:
    prefix = common_prefix_length(a, b)
    assert prefix == common_prefix_length(b, a)
    assert 0 <= prefix <= min(len(a), len(b))
    assert a[:prefix] == b[:prefix]
    if prefix < min(len(a), len(b)):
        assert a[prefix] != b[prefix]
    f1 = token_f1(a, b)
    assert f1 == pytest.approx(token_f1(b, a))
    assert 0.0 <= f1 <= 1.0
    assert (f1 == pytest.approx(1.0)) == (Counter(a) == Counter(b))
    assert token_f1(a, a) == 1.0
    assert common_prefix_length(a, a) == len(a)


def test_auto_candidates_stop_at_the_trained_k_max() -> None:
    from types import SimpleNamespace

    from mtp_torch.bench.runner import _auto_candidates

    trained = SimpleNamespace(default_policy=ConfAdapt(0.9, 4))
    assert _auto_candidates((1, 2, 4, 8, 16), trained) == (1, 2, 4)
    assert _auto_candidates((2, 8), SimpleNamespace(default_policy=ConfAdapt(0.9, 3))) == (1, 2, 3)
    assert _auto_candidates((1, 8), SimpleNamespace(default_policy=StaticK(2))) == (1, 8)
    # Candidates below the trained k_max stay as asked: (1, 2) never becomes k_max=4 (it did,
    # and the bench test that asks for (1, 2) failed whenever k_max=4 timed fastest).
    assert _auto_candidates((1, 2), trained) == (1, 2)
    assert _auto_candidates((2,), trained) == (1, 2)


# --- method classes on the tiny model -----------------------------------------------------------


def _tiny_models(checkpoint: Path) -> tuple[Any, Any, Any]:
    from mtp_torch.bench.methods import ModelsUnderTest, RunSettings
    from mtp_torch.decoding.model import MTPModel

    mtp = MTPModel.from_pretrained(checkpoint, dtype=torch.float32)
    models = ModelsUnderTest("base", mtp.model, mtp)
    eos = mtp.tokenizer.eos_token_id
    return mtp, models, RunSettings(6, [eos], mtp.tokenizer.pad_token_id)


def test_every_method_class_decodes_the_tiny_model(checkpoint: Path) -> None:
    """Each BenchMethod runs through `timed_decode`; the lossless ones reproduce greedy."""
    from mtp_torch.bench.measure import Trace, timed_decode
    from mtp_torch.bench.methods import (
        AutoKDecoding,
        ConfAdaptDecoding,
        PromptLookup,
        StaticKDecoding,
    )

    mtp, models, settings = _tiny_models(checkpoint)
    prompt = _one_prompt(mtp.tokenizer, "how many apples does she have left ?")
    greedy = timed_decode(GreedyGenerate(), models, prompt, settings)
    assert 1 <= len(greedy.generated) <= settings.max_new_tokens
    assert len(greedy.widths) == len(greedy.generated)  # one pass per token (prefill included)
    assert greedy.accepted_histogram == () and greedy.seconds >= 0.0
    lossless = [
        PromptLookup(3),
        StaticKDecoding(1),
        ConfAdaptDecoding(0.3, 4, verify=True),
        AutoKDecoding(0.3, StaticK(1)),
        AutoKDecoding(0.3, ConfAdapt(0.3, 2), verify=True),
    ]
    for method in lossless:
        decoded = timed_decode(method, models, prompt, settings)
        assert decoded.generated == greedy.generated, method.name
    for method in (StaticKDecoding(2), ConfAdaptDecoding(0.3, 4)):
        decoded = timed_decode(method, models, prompt, settings)
        assert len(decoded.generated) <= settings.max_new_tokens
        # The MTP rows report an accepted histogram: one entry per decoding step.
        assert sum(decoded.accepted_histogram) == len(decoded.widths)
        trace = Trace()
        trace.record(decoded)
        assert trace.histogram == list(decoded.accepted_histogram)
        assert method.describe().policy == method.policy


def test_method_classes_describe_their_rows() -> None:
    from mtp_torch.bench.methods import (
        AutoKDecoding,
        ConfAdaptDecoding,
        PromptLookup,
        StaticKDecoding,
    )

    rows = [
        (GreedyGenerate(), "greedy", "greedy", None),
        (PromptLookup(3, "int8"), "prompt_lookup_int8", "prompt_lookup", None),
        (StaticKDecoding(2), "static_2", "static", 2),
        (ConfAdaptDecoding(0.9, 4), "confadapt_0.9_k4", "confadapt", 4),
        (ConfAdaptDecoding(0.9, 4, verify=True), "verify_confadapt_0.9_k4", "verify", 4),
        (
            AutoKDecoding(0.5, StaticK(1), precision="int8"),
            "confadapt_0.5_kauto_int8",
            "confadapt",
            1,
        ),
    ]
    for method, name, family, k_max in rows:
        info = method.describe()
        assert (method.name, info.name, info.family, info.k_max) == (name, name, family, k_max)
    assert PromptLookup(3).describe().prompt_lookup_tokens == 3
    assert AutoKDecoding(0.5, ConfAdapt(0.5, 8)).describe().k_max_auto


def _one_prompt(tokenizer: Any, text: str) -> BenchPrompt:
    from mtp_torch.text import encode_prompt

    return BenchPrompt(text=text, input_ids=encode_prompt(tokenizer, text, chat=True))


# --- the typed report ---------------------------------------------------------------------------

ROW_KEYS = [
    "name",
    "family",
    "precision",
    "policy",
    "verify",
    "threshold",
    "k_max",
    "k_max_auto",
    "prompt_lookup_tokens",
    "num_prompts",
    "generated_tokens",
    "forward_passes",
    "tokens_per_forward",
    "mean_pass_width",
    "seconds",
    "seconds_per_repeat",
    "tokens_per_second",
    "accuracy",
    "num_correct",
    "num_graded",
    "teacher_nll",
    "teacher_nll_skipped_tokens",
    "agreement_prefix",
    "agreement_prefix_fraction",
    "exact_match",
    "token_f1",
    "peak_memory_mb",
    "accepted_histogram",
    "speedup",
    "speedup_vs_fp32_greedy",
    "speedup_ceiling",
    "speedup_spread",
    "speedup_vs_fp32_greedy_spread",
    "speedup_vs_static1",
    "speedup_vs_static1_spread",
]
# Quantised rows also compare with greedy of their own precision.
INT8_ROW_KEYS = [
    *ROW_KEYS[: ROW_KEYS.index("speedup")],
    "agreement_prefix_same_precision",
    "token_f1_same_precision",
    *ROW_KEYS[ROW_KEYS.index("speedup") :],
]


def test_typed_report_round_trips_to_the_same_json(
    checkpoint: Path, data_file: Path, tmp_path: Path
) -> None:
    """The JSON keeps the keys it had as a dict; from_dict(to_dict(r)) == r."""
    from mtp_torch.bench.output import write_report
    from mtp_torch.bench.plot import plot_report
    from mtp_torch.bench.report import BenchReport
    from mtp_torch.decoding.model import MTPModel

    mtp = MTPModel.from_pretrained(checkpoint, dtype=torch.float32)
    prompts = load_prompts(data_file, mtp.tokenizer, num_prompts=1)
    config = BenchConfig(
        max_new_tokens=4,
        k_max=(2, "auto"),
        thresholds=(0.5,),
        static=(2,),
        verify_thresholds=(0.5,),
        quantize="int8",
        prompt_lookup_tokens=2,
        cost_max_tokens=2,
        cost_repeats=1,
        auto_candidates=(1, 2),
        probe_prompts=1,
        probe_tokens=2,
    )
    report = run_benchmark(mtp, prompts, config)
    data = report.to_dict()

    assert list(data) == [
        "meta",
        "cost_curve",
        "k_max_choice",
        "methods",
        "summary",
        "kernel_cost_curve",
    ]
    for row in data["methods"]:
        assert list(row) == (INT8_ROW_KEYS if row["name"].endswith("_int8") else ROW_KEYS)
    assert list(data["summary"]) == [
        "mtp_speedup_same_precision",
        "lossless_speedup_same_precision",
        "kernel_speedup",
        "fastest_vs_fp32_greedy",
    ]
    assert list(data["summary"]["fastest_vs_fp32_greedy"]) == [
        "name",
        "precision",
        "speedup_vs_fp32_greedy",
        "tokens_per_forward",
        "accuracy",
        "teacher_nll",
        "spread",
        "within_noise",
    ]
    assert [list(choice) for choice in data["k_max_choice"]] == [
        ["threshold", "from_method", "acceptance", "expected_speedup", "chosen_k_max"]
    ]
    assert {"machine", "device", "dtype", "teacher", "speedup_definition"} <= set(data["meta"])

    out = tmp_path / "report.json"
    write_report(report, out)
    loaded = json.loads(out.read_text(encoding="utf-8"))
    assert loaded == data
    assert BenchReport.from_dict(loaded) == report
    assert BenchReport.from_dict(loaded).to_dict() == data
    assert format_markdown(loaded) == format_markdown(report)
    plot_report(loaded, tmp_path / "plot.png")  # the plot reads a loaded JSON file too
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    families = {row.family for row in report.methods}
    assert families == {"greedy", "prompt_lookup", "static", "confadapt", "verify"}


def test_report_rows_store_non_finite_floats_as_none() -> None:
    from mtp_torch.bench.report import MethodRow

    row = MethodRow.from_dict(
        {
            **dict.fromkeys(ROW_KEYS, None),
            "name": "greedy",
            "family": "greedy",
            "precision": "float32",
            "verify": False,
            "k_max_auto": False,
            "num_prompts": 1,
            "generated_tokens": 0,
            "forward_passes": 0,
            "seconds": float("nan"),
            "seconds_per_repeat": [0.5],
            "num_graded": 0,
            "teacher_nll_skipped_tokens": 0,
            "speedup": float("inf"),
        }
    )
    assert row.seconds is None and row.speedup is None
    assert list(row.to_dict()) == ROW_KEYS
    json.dumps(row.to_dict(), allow_nan=False)


# --- trust: paired rounds, spread, no credit without multi-token passes ------------------------


def _timed_row(name: str, family: str, seconds: list[float], tpf: float, **extra: Any) -> Any:
    from mtp_torch.bench.report import MethodRow

    return MethodRow(
        **{
            **dict.fromkeys(ROW_KEYS, None),
            "name": name,
            "family": family,
            "precision": extra.pop("precision", "float32"),
            "verify": extra.pop("verify", False),
            "k_max_auto": False,
            "num_prompts": 1,
            "generated_tokens": 100,
            "forward_passes": int(100 / tpf),
            "tokens_per_forward": tpf,
            "seconds_per_repeat": seconds,
            "num_graded": 0,
            "teacher_nll_skipped_tokens": 0,
            **extra,
        }
    )


def test_summary_credits_mtp_only_above_one_token_per_pass_and_says_within_noise() -> None:
    from mtp_torch.bench.output import format_markdown
    from mtp_torch.bench.report import BenchReport, summarize, with_speedups

    rows = [
        _timed_row("greedy", "greedy", [10.0, 10.0, 10.0], 1.0),
        _timed_row("static_1", "static", [9.0, 10.0, 11.0], 1.0, policy="StaticK(1)", k_max=1),
        # Faster than static_1 in every round, but at 1.01 tokens per forward: never credited.
        _timed_row("confadapt_lucky", "confadapt", [5.0, 5.0, 5.0], 1.01, policy="ConfAdapt"),
        # 1.4 tokens per forward, but its per-round ratio straddles 1.0: within noise.
        _timed_row("confadapt_real", "confadapt", [8.0, 10.5, 11.5], 1.4, policy="ConfAdapt"),
    ]
    names = [row.name for row in rows]
    timed = with_speedups(rows, ["greedy"] * 4, "greedy", None, static_baselines=["static_1"] * 4)
    real = timed[names.index("confadapt_real")]
    # Round r against round r: 9/8, 10/10.5, 11/11.5 -> median 0.957, range 0.952-1.125.
    assert real.speedup_vs_static1 == pytest.approx(11 / 11.5)
    assert real.speedup_vs_static1_spread == pytest.approx((10 / 10.5, 9 / 8))
    summary = summarize(timed)
    best = summary.mtp_speedup_same_precision
    assert best is not None and best.name == "confadapt_real" and best.within_noise
    report = BenchReport(meta={}, cost_curve=None, k_max_choice=[], methods=timed, summary=summary)
    text = format_markdown(report)
    assert "confadapt_real" in text and "within noise" in text
    assert "confadapt_lucky at" not in text.split("MTP's own gain")[1].splitlines()[0]
    # With no row at 1.05 tokens per forward or more, nothing is credited to MTP.
    alone = summarize([row for row in timed if row.name != "confadapt_real"])
    assert alone.mtp_speedup_same_precision is None
    report = BenchReport(
        meta={}, cost_curve=None, k_max_choice=[], methods=timed[:3], summary=alone
    )
    assert "none to credit" in format_markdown(report)


def test_the_table_says_how_many_tokens_the_teacher_could_not_score() -> None:
    from mtp_torch.bench.output import format_markdown
    from mtp_torch.bench.report import BenchReport, summarize, with_speedups

    def table(skipped: int) -> str:
        rows = [
            _timed_row("greedy", "greedy", [10.0], 1.0, teacher_nll_skipped_tokens=skipped),
            _timed_row("static_1", "static", [9.0], 1.0, policy="StaticK(1)", k_max=1),
        ]
        timed = with_speedups(
            rows, ["greedy"] * 2, "greedy", None, static_baselines=["static_1"] * 2
        )
        return format_markdown(
            BenchReport(
                meta={}, cost_curve=None, k_max_choice=[], methods=timed, summary=summarize(timed)
            )
        )

    assert (
        "Teacher NLL leaves out 7 generated tokens (greedy: 7): they are outside the teacher's "
        "vocabulary"
    ) in table(7)
    assert "Teacher NLL leaves out" not in table(0)


def test_kernel_rows_decode_on_the_pass_their_kernel_picks(
    checkpoint: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``kernel="native"`` the MTP rows decode on the fused pass (what a user's
    ``MTPModel(..., linear_kernel="native")`` runs), not on transformers' forward with patched
    products; the caller's stock wrapper is left as it was."""
    from mtp_torch.decoding.model import MTPModel

    picked: list[tuple[str, str]] = []
    original = MTPModel.decoding_backend

    def recording(self: Any, plan: Any = None) -> Any:
        backend = original(self, plan)
        picked.append((self.linear_kernel, type(backend).__name__))
        return backend

    monkeypatch.setattr(MTPModel, "decoding_backend", recording)
    mtp = MTPModel.from_pretrained(checkpoint, dtype=torch.float32)
    prompts = load_prompts(data_file, mtp.tokenizer, num_prompts=1)
    config = BenchConfig(
        max_new_tokens=4, k_max=(2,), thresholds=(0.5,), static=(), verify_thresholds=(),
        kernel="native", prompt_lookup_tokens=None, cost_max_tokens=2, cost_repeats=1,
    )  # fmt: skip
    report = run_benchmark(mtp, prompts, config)
    rows = {row.name: row for row in report.methods}
    assert {"static_1_native", "confadapt_0.5_k2_native"} <= set(rows)
    # The fused pass never calls the model's forward; its passes are still counted.
    assert rows["static_1_native"].tokens_per_forward == pytest.approx(
        rows["static_1"].tokens_per_forward
    )
    assert rows["confadapt_0.5_k2_native"].forward_passes > 0
    assert ("native", "FusedBackend") in picked  # the kernel rows' generate
    assert ("native", "TorchBackend") not in picked
    assert mtp.linear_kernel == "stock"


def test_the_cpu_flags_are_a_known_subset_in_a_fixed_order() -> None:
    from mtp_torch.decoding.native import ISA_FLAGS, cpu_description, cpu_isa, cpu_model

    isa = cpu_isa()
    assert list(isa) == [flag for flag in ISA_FLAGS if flag in isa]
    listed = set(cpu_description().rpartition("|")[2].split())
    assert set(isa) == listed & set(ISA_FLAGS)
    assert cpu_model() and "|" not in cpu_model()


def test_a_busy_cpu_is_said_before_the_timings_and_old_reports_print_no_machine() -> None:
    from mtp_torch.bench.output import _machine_note
    from mtp_torch.bench.runner import _warn_if_busy

    said: list[str] = []
    _warn_if_busy({"load_average_at_start": 3.1, "cpu_count": 2}, said.append)
    assert len(said) == 1 and "load average 3.1 on 2 cores" in said[0]
    for quiet in ({"load_average_at_start": 1.2, "cpu_count": 2}, {"load_average_at_start": None}):
        _warn_if_busy(quiet, said.append)
    assert len(said) == 1
    # Reports written before the CPU was recorded have no such line (and still format).
    assert _machine_note({"platform": "Linux", "cpu_count": 2}) is None
    note = _machine_note(
        {"cpu": "Some CPU", "isa": "avx2 fma", "cpu_count": 2, "torch_threads": 2,
         "load_average_at_start": 0.4}
    )  # fmt: skip
    assert note == (
        "Machine: Some CPU, 2 cores, torch threads 2; ISA: avx2 fma; "
        "1-minute load average at the start 0.4"
    )
