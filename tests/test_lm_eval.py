"""The lm-evaluation-harness model "mtp": harness tasks run with MTP decoding.

Offline: a tiny random Llama with a word-level tokenizer, saved as an MTP checkpoint, and three
local tasks (a generation task, a multiple-choice task and a perplexity task) over a JSON-lines
file, loaded with ``TaskManager(include_path=...)``.  The key check is decode equivalence
through the harness: with ``policy=static:1`` the "mtp" model's generations equal those of the
harness's own "hf" model decoding greedily with the same weights, and its scores equal "hf"'s.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
try:
    import lm_eval
except ImportError:
    if os.environ.get("CI"):
        raise  # .ci/run installs the lm-eval extra: there this test must run, never skip
    pytest.skip("the lm-eval extra is not installed", allow_module_level=True)

from lm_eval.tasks import TaskManager  # noqa: E402

from mtp_torch import MTPModel, StaticK  # noqa: E402
from mtp_torch.integrations.stopping import DecodeSettings, decode_until  # noqa: E402
from tests.synthetic import WORDS, make_tokenizer, tiny_llama  # noqa: E402

TASKS = ["tiny_gen", "tiny_choice", "tiny_text"]


def _task_files(folder: Path, data: Path, cache: Path) -> None:
    """YAML files of the three local tasks, all over the JSON-lines file ``data``."""
    source = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)},
        "test_split": "test",
    }
    tasks = {
        "tiny_gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            # "b" and "world" cut some continuations short; the budget ends the others.
            "generation_kwargs": {"until": ["b", "world"], "max_gen_toks": 10, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        },
        "tiny_choice": {
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": ["five", "a b", "hello world"],
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}],
        },
        "tiny_text": {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{question}} {{answer}}",
            "metric_list": [{"metric": "word_perplexity"}],
        },
    }
    for name, config in tasks.items():  # JSON is YAML
        (folder / f"{name}.yaml").write_text(
            json.dumps({"task": name, **source, **config}), encoding="utf-8"
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A saved tiny MTP checkpoint and a task manager that knows the local tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = make_tokenizer(chat=True)
    model = tiny_llama(len(tokenizer), hidden_size=32, layers=2, seed=3)
    checkpoint = MTPModel(model, tokenizer=tokenizer).save_pretrained(root / "tiny-mtp")
    rows = [
        {
            "question": " ".join(WORDS[(3 * i) % len(WORDS) :][: 2 + i % 4]),
            "answer": "five",
            "label": i % 3,
        }
        for i in range(6)
    ]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "tasks").mkdir()
    _task_files(root / "tasks", data, root / "datasets-cache")
    manager = TaskManager(include_path=str(root / "tasks"), include_defaults=False)
    return {"checkpoint": checkpoint, "manager": manager}


def _evaluate(setup: dict[str, Any], model: str, model_args: str, **kwargs: Any) -> dict[str, Any]:
    import mtp_torch.integrations.lm_eval  # noqa: F401  (registers "mtp")

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=f"pretrained={setup['checkpoint']},{model_args}",
        tasks=kwargs.pop("tasks", TASKS),
        task_manager=setup["manager"],
        device="cpu",
        batch_size=2,
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    assert results is not None
    return results


def _responses(results: dict[str, Any], task: str) -> list[Any]:
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples]


@pytest.fixture(scope="module")
def hf_results(setup: dict[str, Any]) -> dict[str, Any]:
    return _evaluate(setup, "hf", "dtype=float32")


def test_static_1_equals_the_harness_hf_model(
    setup: dict[str, Any], hf_results: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The harness may stop its loggers propagating, so listen on the adapter's logger itself.
    adapter_logger = logging.getLogger("lm_eval.models.mtp")
    adapter_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lm_eval.models.mtp"):
            results = _evaluate(setup, "mtp", "policy=static:1")
    finally:
        adapter_logger.removeHandler(caplog.handler)
    # Generation: the same continuations, cut at the same stop strings.
    generated = _responses(results, "tiny_gen")
    assert generated == _responses(hf_results, "tiny_gen")
    assert any(len(text[0][0].split()) < 10 for text in generated)  # some met a stop string
    # Scoring: the same log-likelihoods (plain forward passes of the same weights).
    for task in ("tiny_choice", "tiny_text"):
        ours, theirs = _responses(results, task), _responses(hf_results, task)
        flat = json.dumps(ours)
        assert flat.count(",") == json.dumps(theirs).count(",")
        for mine, reference in zip(_floats(ours), _floats(theirs), strict=True):
            assert mine == pytest.approx(reference, rel=1e-4, abs=1e-4)
    for task in TASKS:
        assert results["results"][task].keys() == hf_results["results"][task].keys()
    # The tally: one token per forward pass, reported beside the metrics and in the log.
    config = results["config"]
    assert config["mtp_tokens_per_forward"] == pytest.approx(1.0)
    assert config["mtp_generation_requests"] == 6
    assert config["mtp_forward_passes"] >= 1
    assert config["mtp_stats_by_task"]["tiny_gen"]["num_requests"] == 6
    assert "tokens per forward pass" in caplog.text


def _floats(value: Any) -> list[float]:
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [number for item in value for number in _floats(item)]


def test_multi_token_policy_runs_and_reports_tokens_per_forward(setup: dict[str, Any]) -> None:
    results = _evaluate(setup, "mtp", "policy=static:3", tasks=["tiny_gen"])
    assert "exact_match,none" in results["results"]["tiny_gen"]
    # Three tokens per step, except where a stop string or the budget cut the last step.
    assert 1.0 < results["config"]["mtp_tokens_per_forward"] <= 3.0


def test_lossless_mode_equals_the_harness_hf_model(
    setup: dict[str, Any], hf_results: dict[str, Any]
) -> None:
    results = _evaluate(setup, "mtp", "policy=confadapt:0.5:4,verify=True", tasks=["tiny_gen"])
    assert _responses(results, "tiny_gen") == _responses(hf_results, "tiny_gen")
    assert results["config"]["mtp_tokens_per_forward"] >= 1.0


def test_decode_stops_once_every_row_met_a_stop_string(setup: dict[str, Any]) -> None:
    mtp = MTPModel.from_pretrained(setup["checkpoint"])
    tokenizer = mtp.tokenizer
    prompts = [tokenizer.encode("what is two"), tokenizer.encode("a b c hello world the")]
    settings = DecodeSettings(policy=StaticK(1), max_new_tokens=24)
    # Without stop strings the rows run to their budget (or the EOS token).
    full, _ = decode_until(mtp, prompts, [], settings)
    stop = tokenizer.decode(full[0][2:3])  # the row's third token ends it
    cut, stats = decode_until(mtp, prompts, [stop], settings)
    for whole, part in zip(full, cut, strict=True):
        assert part == whole[: len(part)]
        text = tokenizer.decode(part, skip_special_tokens=False)
        assert stop in text or len(part) == len(whole)
        assert stop not in tokenizer.decode(part[:-1], skip_special_tokens=False)
    assert len(cut[0]) == 3
    # One token per pass; the decode ended at the step that finished the last row.
    assert stats.num_forward_passes == max(len(part) for part in cut)
    assert stats.num_generated_tokens == sum(len(part) for part in cut)
    assert stats.tokens_per_forward == pytest.approx(1.0)


def test_default_policy_chat_template_and_lm_attributes(setup: dict[str, Any]) -> None:
    from mtp_torch.integrations.lm_eval import MTPEvalLM

    lm = MTPEvalLM(pretrained=str(setup["checkpoint"]), device="cpu", batch_size=3)
    assert lm.policy == MTPModel.from_pretrained(setup["checkpoint"]).default_policy
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["tiny_gen"],
        task_manager=setup["manager"],
        apply_chat_template=True,
        bootstrap_iters=0,
    )
    assert results is not None
    assert "exact_match,none" in results["results"]["tiny_gen"]
    assert lm.tokens_per_forward >= 1.0
    assert lm.num_forward_passes >= 1
    assert lm.generation_stats.num_requests == 6
    assert lm.apply_chat_template([{"role": "user", "content": "hello"}]).startswith("<|user|>")


def test_bad_arguments_raise(setup: dict[str, Any]) -> None:
    from mtp_torch.integrations.lm_eval import MTPEvalLM

    mtp = MTPModel.from_pretrained(setup["checkpoint"])
    with pytest.raises(ValueError, match="batch_size"):
        MTPEvalLM(pretrained=mtp, batch_size="auto")
    with pytest.raises(ValueError, match="policy"):
        MTPEvalLM(pretrained=mtp, policy="fast")
    assert MTPEvalLM(pretrained=mtp, policy=StaticK(2)).policy == StaticK(2)
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        MTPEvalLM(pretrained=mtp, linear_kernel="fast")


def test_skinny_kernel_gives_the_stock_responses(
    setup: dict[str, Any], hf_results: dict[str, Any]
) -> None:
    results = _evaluate(setup, "mtp", "policy=static:1,linear_kernel=skinny", tasks=["tiny_gen"])
    assert _responses(results, "tiny_gen") == _responses(hf_results, "tiny_gen")
    mtp = MTPModel.from_pretrained(setup["checkpoint"], linear_kernel="skinny")
    from mtp_torch.integrations.lm_eval import MTPEvalLM

    assert MTPEvalLM(pretrained=mtp).mtp.linear_kernel == "skinny"  # None keeps the model's


def test_bundled_gsm8k_example_task_is_the_harness_gsm8k_cot() -> None:
    """examples/lm_eval/gsm8k_cot_bundled.yaml: gsm8k_cot's settings over the bundled rows."""
    from importlib import resources

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples" / "lm_eval"
    manager = TaskManager(include_path=str(examples), include_defaults=False)
    task = manager.load(["gsm8k_cot_bundled"])["tasks"]["gsm8k_cot_bundled"]
    harness_file = resources.files("lm_eval.tasks") / "gsm8k" / "gsm8k-cot.yaml"
    harness = yaml.safe_load(harness_file.read_text("utf-8"))
    keys = ("output_type", "doc_to_text", "doc_to_target", "num_fewshot", "generation_kwargs")
    for key in (*keys, "filter_list", "metric_list"):
        assert getattr(task.config, key) == harness[key], key
    assert list(task.fewshot_docs()) == harness["fewshot_config"]["samples"]
    docs = list(task.test_docs())
    assert len(docs) == 256
    assert docs[0]["answer"].split("####")[-1].strip().isdigit()
