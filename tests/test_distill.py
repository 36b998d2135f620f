"""Self-distillation training (mtp_torch.training): layout in torch, losses, resume, learning."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
)

from mtp_core import ConfAdapt
from mtp_core._src.layout import TrainingLayoutSpec, training_layout
from mtp_torch.cli.app import main as cli_main
from mtp_torch.decoding.mask import add_mask_token
from mtp_torch.decoding.model import MTPModel
from mtp_torch.training.batch import draw_batch
from mtp_torch.training.batch import pack_windows as _pack
from mtp_torch.training.config import DistillConfig, cpu_preset
from mtp_torch.training.data import TokenStream
from mtp_torch.training.distill import distill
from mtp_torch.training.parameters import find_blocks
from mtp_torch.training.step import (
    StepMetrics,
    StepStats,
    _batch_loss,
    init_train_state,
    learning_rate,
    train_step,
)
from tests.synthetic import (
    make_language,
    make_tokenizer,
    next_token_accuracy,
    tiny_llama,
    train_teacher,
)

VOCAB = 40


def tiny_gpt2(
    attn_implementation: str = "sdpa", dropout: float = 0.0, seed: int = 0
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(config)


def random_corpus(count: int = 16, length: int = 60, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=length).tolist() for _ in range(count)]


def quiet(**kwargs: object) -> DistillConfig:
    """A small config for tiny models; keyword arguments override."""
    settings: dict[str, object] = {
        "k_max": 4,
        "steps": 4,
        "seq_len": 32,
        "batch_size": 4,
        "lr": 1e-3,
        "progress": False,
        "device": "cpu",
    }
    settings.update(kwargs)
    return DistillConfig(**settings)  # type: ignore[arg-type]


# --- the packed layout in torch -----------------------------------------------------------------

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _model_with_mask(arch: str, attn: str) -> tuple[torch.nn.Module, int]:
    key = (arch, attn)
    if key not in _MODELS:
        if arch == "llama":
            model = tiny_llama(VOCAB, hidden_size=32, dtype=torch.float64, attn_implementation=attn)
        else:
            model = tiny_gpt2(attn).to(torch.float64)
        add_mask_token(model)
        _MODELS[key] = model.eval()
    model = _MODELS[key]
    return model, int(model.config.mtp_mask_token_id)


@pytest.mark.parametrize(
    ("arch", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")]
)
@given(
    k=st.integers(min_value=2, max_value=5),
    num_regions=st.integers(min_value=1, max_value=4),
    offset_fraction=st.floats(min_value=0.0, max_value=0.999),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_packed_layout_logits_equal_plain_causal_forward(
    arch: str, attn: str, k: int, num_regions: int, offset_fraction: float, seed: int
) -> None:
    """Each region's k predictions equal a plain causal pass on its prefix + k-1 masks."""
    model, mask_id = _model_with_mask(arch, attn)
    seq_len = num_regions * (2 * k + 1)
    prefix_len = TrainingLayoutSpec(seq_len, k, num_regions).prefix_len
    offset = int(offset_fraction * prefix_len)
    layout = training_layout(TrainingLayoutSpec(seq_len, k, num_regions, offset))
    window = np.random.default_rng(seed).integers(0, VOCAB, size=(2, layout.spec.window_len))
    weights = np.ones(window.shape, dtype=np.float32)
    packed = _pack(window, weights, layout, mask_id, torch.device("cpu"), prefix_loss=False)
    cfg = DistillConfig(k_max=k, seq_len=seq_len, num_regions=num_regions, loss="gt")
    with torch.no_grad():
        out = _batch_loss(model, model, model, packed, cfg, mask_id, contextlib.nullcontext())
    packed_logits, targets = out.student_logits, out.targets
    assert packed_logits.shape == (2, num_regions, k, VOCAB + 1)
    np.testing.assert_array_equal(targets.numpy(), window[:, layout.target_index])
    for region in range(num_regions):
        last_real = int(layout.source_index[layout.predict_index[region, 0]])
        prefix = torch.from_numpy(window[:, : last_real + 1])
        masks = torch.full((2, k - 1), mask_id, dtype=torch.long)
        with torch.no_grad():
            plain = model(input_ids=torch.cat([prefix, masks], dim=1)).logits[:, -k:]
        assert packed_logits.dtype == torch.float64
        torch.testing.assert_close(packed_logits[:, region], plain)


# --- configuration and bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_max": 1}, "k_max"),
        ({"loss": "kl"}, "loss"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-5}, "lr"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"betas": (1.0, 0.9)}, "betas"),
        ({"clip": 0.0}, "clip"),
        ({"minutes": 0}, "minutes"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"lr_decay_steps": -1}, "lr_decay_steps"),
        ({"steps": 10, "lr_decay_steps": 11}, "exceeds steps"),
        ({"lr_decay_minutes": -1.0}, "lr_decay_minutes"),
        ({"lr_decay_minutes": 1.0}, "needs a time budget"),
        ({"minutes": 5.0, "lr_decay_minutes": 6.0}, "needs a time budget"),
        ({"minutes": 5.0, "lr_decay_minutes": 1.0, "lr_decay_steps": 1}, "not both"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"train_layers": -1}, "train_layers"),
        ({"train_layers": 0, "train_mask_embedding": False}, "nothing to train"),
        ({"k_max": 16, "seq_len": 40, "num_regions": 2}, "larger than the region"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults_follow_the_paper() -> None:
    cfg = DistillConfig()
    assert (cfg.k_max, cfg.loss, cfg.lr, cfg.seq_len, cfg.regions) == (16, "hard", 1e-5, 160, 5)
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.1 and cfg.clip == 1.0
    assert cpu_preset().k_max >= 2
    assert cpu_preset(k_max=3).k_max == 3


@pytest.mark.parametrize("corpus", [[], [[]], [[], []]])
def test_empty_corpus_is_rejected(corpus: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="empty"):
        distill(tiny_llama(VOCAB, hidden_size=16), corpus, quiet())


def test_corpus_shorter_than_one_window_is_rejected() -> None:
    with pytest.raises(ValueError, match="window needs"):
        distill(tiny_llama(VOCAB, hidden_size=16), [[1, 2, 3], [4, 5]], quiet())


def test_k_max_larger_than_region_is_rejected() -> None:
    with pytest.raises(ValueError, match="larger than the region"):
        quiet(k_max=12, seq_len=32, num_regions=2)


def test_non_causal_model_is_rejected() -> None:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    with pytest.raises(ValueError, match="not causal"):
        distill(BertForMaskedLM(config), random_corpus(), quiet())


def test_train_layers_beyond_the_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="train_layers"):
        distill(tiny_llama(VOCAB, hidden_size=16), random_corpus(), quiet(train_layers=5))


# --- each loss lowers its own objective ----------------------------------------------------------


@pytest.fixture(scope="module")
def language_and_teacher() -> tuple[object, torch.nn.Module]:
    language = make_language(32)
    teacher = train_teacher(language)
    assert next_token_accuracy(teacher, language) == 1.0
    return language, teacher


def _objective(
    student: torch.nn.Module, teacher: torch.nn.Module, corpus: list[list[int]], cfg: DistillConfig
) -> float:
    """Mean loss of ``cfg.loss`` over a fixed set of (k, offset) layouts and windows."""
    mask_id = int(student.config.mtp_mask_token_id)
    stream = np.concatenate([np.asarray(s) for s in corpus])
    values = []
    student.eval()
    for k in range(2, cfg.k_max + 1):
        for offset in (0, 2):
            layout = training_layout(TrainingLayoutSpec(cfg.seq_len, k, cfg.regions, offset))
            width = layout.spec.window_len
            windows = np.stack([stream[i * width : (i + 1) * width] for i in range(8)])
            packed = _pack(
                windows,
                np.ones(windows.shape, dtype=np.float32),
                layout,
                mask_id,
                torch.device("cpu"),
                prefix_loss=False,
            )
            with torch.no_grad():
                loss = _batch_loss(
                    student, student, teacher, packed, cfg, mask_id, contextlib.nullcontext()
                ).loss
            values.append(float(loss))
    return float(np.mean(values))


@pytest.mark.parametrize("kind", ["hard", "soft", "gt"])
def test_each_loss_lowers_its_objective(
    kind: str, language_and_teacher: tuple[object, torch.nn.Module]
) -> None:
    language, trained = language_and_teacher
    corpus = language.documents(60, 40, seed=7)  # type: ignore[attr-defined]
    cfg = quiet(loss=kind, steps=40, seq_len=64, batch_size=8, lr=3e-3, weight_decay=0.0)
    teacher = copy.deepcopy(trained)
    before_student = copy.deepcopy(trained)
    add_mask_token(before_student, seed=cfg.seed)
    before = _objective(before_student, teacher, corpus, cfg)
    student = distill(copy.deepcopy(trained), corpus, cfg).model
    after = _objective(student, teacher, corpus, cfg)
    assert after < 0.7 * before, (kind, before, after)


# --- freezing, the mask learning rate, logging ---------------------------------------------------


def test_train_layers_freezes_lower_blocks_and_other_embedding_rows() -> None:
    model = tiny_llama(VOCAB, hidden_size=16, layers=3)
    original = copy.deepcopy(model)
    mtp = distill(model, random_corpus(), quiet(train_layers=1, steps=3, lr=1e-2))
    trained = mtp.model
    mask_id = mtp.mask_token_id
    blocks_before, blocks_after = find_blocks(original), find_blocks(trained)
    for index in (0, 1):
        for a, b in zip(
            blocks_before[index].parameters(), blocks_after[index].parameters(), strict=True
        ):
            assert torch.equal(a, b)
    assert not all(
        torch.equal(a, b)
        for a, b in zip(blocks_before[2].parameters(), blocks_after[2].parameters(), strict=True)
    )
    for name in ("get_input_embeddings", "get_output_embeddings"):
        old = getattr(original, name)().weight
        new = getattr(trained, name)().weight
        assert torch.equal(old, new[:VOCAB])
    fresh = tiny_llama(VOCAB, hidden_size=16, layers=3)
    add_mask_token(fresh, seed=0)
    assert not torch.equal(
        fresh.get_input_embeddings().weight[mask_id], trained.get_input_embeddings().weight[mask_id]
    )
    assert all(p.requires_grad for p in trained.parameters())


def test_mask_lr_multiplier_scales_the_mask_rows_update() -> None:
    moves = {}
    for multiplier in (1.0, 5.0):
        model = tiny_llama(VOCAB, hidden_size=16)
        fresh = copy.deepcopy(model)
        mask_id = add_mask_token(fresh, seed=0)
        start = fresh.get_input_embeddings().weight[mask_id].clone()
        mtp = distill(
            model, random_corpus(), quiet(steps=1, train_layers=1, mask_lr_multiplier=multiplier)
        )
        moves[multiplier] = mtp.model.get_input_embeddings().weight[mask_id].detach() - start
    assert moves[1.0].abs().max() > 0
    torch.testing.assert_close(moves[5.0], 5.0 * moves[1.0])


def test_metrics_are_logged_as_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    seen = []
    distill(
        tiny_llama(VOCAB, hidden_size=16),
        random_corpus(),
        quiet(steps=3, log_path=str(log)),
        on_step=seen.append,
    )
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] == [m.step for m in seen]
    for row in rows:
        assert len(row["agreement"]) == row["ks"][-1]
        assert all(0.0 <= a <= 1.0 for a in row["agreement"])
        assert (
            row["tokens_per_s"] > 0
            and row["supervised_tokens"] == 4 * quiet().regions * row["ks"][0]
        )


# --- checkpoints: a killed and resumed run equals an uninterrupted one --------------------------


def _resume_config(out_dir: Path, steps: int, **kwargs: object) -> DistillConfig:
    return quiet(
        steps=steps,
        out_dir=str(out_dir),
        checkpoint_every=2,
        resume=True,
        grad_accum=2,
        warmup_steps=3,
        mask_lr_multiplier=3.0,
        **kwargs,
    )


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    corpus = random_corpus(count=6, length=40)  # short: the stream wraps during the run
    straight = distill(tiny_gpt2(dropout=0.1), corpus, _resume_config(tmp_path / "a", 6)).model
    distill(tiny_gpt2(dropout=0.1), corpus, _resume_config(tmp_path / "b", 3))
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 3
    resumed = distill(tiny_gpt2(dropout=0.1), corpus, _resume_config(tmp_path / "b", 6)).model
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(list((tmp_path / "b").glob("checkpoint-*"))) == 1
    assert not list((tmp_path / "b").glob(".*tmp*"))


def test_learning_rate_warms_up_holds_and_decays_linearly() -> None:
    cfg = quiet(steps=10, lr=1.0, warmup_steps=2, lr_decay_steps=4)
    rates = [learning_rate(cfg, step) for step in range(cfg.steps)]
    assert rates == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [learning_rate(quiet(steps=3, lr=1.0), s) for s in range(3)] == [1.0] * 3
    # Warm-up and decay overlapping: the smaller factor wins.
    assert [learning_rate(quiet(steps=2, lr=1.0, warmup_steps=2, lr_decay_steps=2), s)
            for s in range(2)] == [0.5, 0.5]  # fmt: skip


def test_a_decay_can_continue_a_constant_rate_run(tmp_path: Path) -> None:
    """The decay is resumable: a constant-rate checkpoint continued with a decay over its last
    steps equals a run that had the decay from the start (warm-up/stable/decay branching)."""
    corpus = random_corpus(count=6, length=40)
    decayed = _resume_config(tmp_path / "a", 6, lr_decay_steps=3)
    straight = distill(tiny_gpt2(dropout=0.1), corpus, decayed).model
    distill(tiny_gpt2(dropout=0.1), corpus, _resume_config(tmp_path / "b", 3))
    branch = _resume_config(tmp_path / "b", 6, lr_decay_steps=3)
    resumed = distill(tiny_gpt2(dropout=0.1), corpus, branch).model
    constant = distill(tiny_gpt2(dropout=0.1), corpus, _resume_config(tmp_path / "c", 6)).model
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert any(
        not torch.equal(a, c)
        for a, c in zip(straight.parameters(), constant.parameters(), strict=True)
    )


def test_a_time_budget_decays_over_its_last_minutes() -> None:
    from mtp_torch.training.distill import _Run, _time_decay

    run = _Run(rank=0, world_size=1, device=torch.device("cpu"), flex_attention=False)
    cfg = quiet(minutes=10.0, lr_decay_minutes=2.0)
    now = time.perf_counter()
    assert _time_decay(cfg, now - 7 * 60, run) == 1.0
    # abs=0.02: 2.4 s of the clock may pass between `now` and the call on a loaded machine.
    assert _time_decay(cfg, now - 9 * 60, run) == pytest.approx(0.5, abs=0.02)
    assert _time_decay(cfg, now - 11 * 60, run) == 0.0
    assert _time_decay(quiet(minutes=10.0), now - 9.9 * 60, run) == 1.0
    # End to end: a budget that is all decay logs a falling rate below the peak.
    logged: list[StepMetrics] = []
    cfg = quiet(steps=10**6, minutes=0.03, lr_decay_minutes=0.03, lr=1e-3)
    distill(tiny_llama(VOCAB, hidden_size=16), random_corpus(), cfg, on_step=logged.append)
    rates = [m.lr for m in logged]
    assert len(rates) >= 2 and rates == sorted(rates, reverse=True)
    assert rates[0] < 1e-3 and rates[-1] < rates[0]


def test_distill_is_train_step_in_a_loop() -> None:
    """distill adds nothing to the step function: init_train_state, draw_batch and train_step
    driven by hand give bitwise the same per-step losses and final weights (dropout on, with
    gradient accumulation, warm-up, the mask-row rate and the prefix loss)."""
    cfg = quiet(
        steps=5, grad_accum=2, warmup_steps=2, mask_lr_multiplier=3.0, prefix_loss_weight=1.0
    )
    corpus = random_corpus(count=6, length=40)
    logged: list[StepMetrics] = []
    by_distill = distill(tiny_gpt2(dropout=0.1), corpus, cfg, on_step=logged.append).model
    model = tiny_gpt2(dropout=0.1)
    stream = TokenStream.from_sequences(corpus, seed=cfg.seed)
    state = init_train_state(model, None, cfg, torch.device("cpu"))
    by_hand: list[StepStats] = []
    while state.step < cfg.steps:
        batch = draw_batch(
            state.generator,
            stream,
            cfg,
            mask_token_id=state.mask_token_id,
            device=torch.device("cpu"),
        )
        state, stats = train_step(state, batch)
        by_hand.append(stats)
    assert [s.loss for s in by_hand] == [m.loss for m in logged]
    assert [s.grad_norm for s in by_hand] == [m.grad_norm for m in logged]
    assert [s.ks for s in by_hand] == [m.ks for m in logged]
    for (name, a), (_, b) in zip(
        by_distill.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_is_rejected(tmp_path: Path) -> None:
    corpus = random_corpus()
    distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 2))
    with pytest.raises(ValueError, match="k_max"):
        distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 4, k_max=3))


def test_resume_on_other_data_is_rejected(tmp_path: Path) -> None:
    """Same length, other tokens: the data's fingerprint differs."""
    corpus = random_corpus()
    distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 2))
    other = random_corpus(seed=1)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint was trained on other data"):
        distill(tiny_gpt2(), other, _resume_config(tmp_path, 4))
    distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 4))  # the same data still resumes


# --- learning: the tiny teacher's language becomes ~k_max tokens per forward ---------------------


@pytest.mark.slow
def test_distilled_synthetic_model_decodes_several_tokens_per_forward(
    language_and_teacher: tuple[object, torch.nn.Module],
) -> None:
    language, trained = language_and_teacher
    corpus = language.documents(200, 40, seed=5)  # type: ignore[attr-defined]
    cfg = DistillConfig(
        k_max=4,
        steps=300,
        seq_len=64,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        progress=False,
        device="cpu",
    )
    mtp = distill(copy.deepcopy(trained), corpus, cfg)
    prompts = torch.tensor([[s, *language.continue_from(s, 3)] for s in range(8)])  # type: ignore[attr-defined]
    out = mtp.generate(prompts, ConfAdapt(0.9, 4), max_new_tokens=32, eos_token_id=[])
    for row in range(prompts.shape[0]):
        expected = language.continue_from(int(prompts[row, -1]), 32)  # type: ignore[attr-defined]
        assert out.sequences[row, prompts.shape[1] :].tolist() == expected
    assert out.tokens_per_forward > 3.3


def test_frozen_embeddings_stay_put_and_upper_blocks_train() -> None:
    model = tiny_llama(VOCAB, hidden_size=16, layers=3)
    fresh = copy.deepcopy(model)
    add_mask_token(fresh, seed=0)
    trained = distill(
        model, random_corpus(), quiet(train_layers=1, train_mask_embedding=False, steps=2)
    ).model
    assert torch.equal(fresh.get_input_embeddings().weight, trained.get_input_embeddings().weight)
    assert torch.equal(fresh.get_output_embeddings().weight, trained.get_output_embeddings().weight)
    assert not torch.equal(
        find_blocks(fresh)[2].mlp.up_proj.weight, find_blocks(trained)[2].mlp.up_proj.weight
    )


# --- mtp convert ----------------------------------------------------------------------------------


def _tiny_model_dir(tmp_path: Path) -> Path:
    tokenizer = make_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=16)
    directory = tmp_path / "tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_convert_command_writes_a_loadable_mtp_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _tiny_model_dir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": "what is two plus three the answer five " * 4}) + "\n"
            for _ in range(4)
        )
    )
    out = tmp_path / "out"
    common = ["convert", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    small = ["--k-max", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress"]
    assert cli_main([*common, "--steps", "2", *small]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["k_max"] == 2
    mtp = MTPModel.from_pretrained(out)
    assert mtp.mask_token_id == len(make_tokenizer())
    assert mtp.default_policy == ConfAdapt(0.9, 2)
    # --resume continues from <out>.ckpt up to the new step count.
    assert cli_main([*common, "--steps", "3", "--resume", *small]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 3


def test_convert_command_lets_the_model_write_its_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _tiny_model_dir(tmp_path)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in ("what is two", "hello world", "a b c"))
    )
    cache = tmp_path / "corpus.jsonl"
    argv = [
        "convert",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "1",
        "--k-max",
        "2",
        "--seq-len",
        "8",
        "--batch-size",
        "1",
        "--no-progress",
        "--seed-prompts",
        str(seeds),
        "--num-examples",
        "3",
        "--response-tokens",
        "12",
        "--corpus-cache",
        str(cache),
        "--train-layers",
        "all",
    ]
    assert cli_main(argv) == 0
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert 1 <= len(rows) <= 3 and all(r["source"] == "seed" for r in rows)


def test_convert_command_reports_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _tiny_model_dir(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = [
        "convert",
        "--model",
        str(model_dir),
        "--data",
        str(empty),
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
    ]
    assert cli_main(argv) == 2
    assert "empty" in capsys.readouterr().err
    # A decay counts back from the last step: a time budget alone cannot place it.
    decay = ["convert", "--model", str(model_dir), "--minutes", "1", "--lr-decay-steps", "5"]
    assert cli_main([*decay, "--out", str(tmp_path / "d")]) == 2
    assert "--lr-decay-steps counts back from the last step" in capsys.readouterr().err


def test_training_only_the_mask_rows_keeps_real_token_predictions() -> None:
    model = tiny_llama(VOCAB, hidden_size=16)
    original = copy.deepcopy(model)
    mtp = distill(model, random_corpus(), quiet(train_layers=0, steps=3, lr=1e-2))
    trained, mask_id = mtp.model, mtp.mask_token_id
    ids = torch.tensor(random_corpus(count=2, length=12, seed=3))
    with torch.no_grad():
        before = original(input_ids=ids).logits
        after = trained(input_ids=ids).logits[..., :VOCAB]
    torch.testing.assert_close(before, after)
    fresh = tiny_llama(VOCAB, hidden_size=16)
    add_mask_token(fresh, seed=0)
    assert not torch.equal(
        fresh.get_input_embeddings().weight[mask_id], trained.get_input_embeddings().weight[mask_id]
    )


def test_prefix_loss_adds_the_real_slots_loss() -> None:
    model = tiny_llama(VOCAB, hidden_size=16, dtype=torch.float64)
    add_mask_token(model)
    mask_id = int(model.config.mtp_mask_token_id)
    layout = training_layout(TrainingLayoutSpec(32, 3, 4, 1))
    windows = np.random.default_rng(0).integers(0, VOCAB, size=(2, layout.spec.window_len))
    losses = {}
    for weight in (0.0, 1.0):
        cfg = quiet(loss="gt", prefix_loss_weight=weight)
        packed = _pack(
            windows,
            np.ones(windows.shape, dtype=np.float32),
            layout,
            mask_id,
            torch.device("cpu"),
            prefix_loss=weight > 0,
        )
        with torch.no_grad():
            losses[weight] = _batch_loss(
                model, model, model, packed, cfg, mask_id, contextlib.nullcontext()
            ).loss
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows[:, : layout.spec.num_real])).logits
    targets = torch.from_numpy(windows[:, 1 : layout.spec.num_real + 1])
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB + 1), targets.reshape(-1))
    torch.testing.assert_close(losses[1.0] - losses[0.0], plain)


@pytest.mark.parametrize(
    ("loss", "kind", "weight", "anchor", "teacher"),
    [
        ("hard", None, 2.0, "soft", True),  # today's default: a KL anchor beside a teacher loss
        ("gt", None, 2.0, "gt", False),  # ... and a cross-entropy anchor beside "gt"
        ("gt", "soft", 2.0, "soft", True),  # an explicit teacher kind brings the teacher back
        ("gt", "hard", 0.0, "hard", False),  # no anchor weight, no teacher for it
        ("soft", "gt", 1.0, "gt", True),
    ],
)
def test_the_anchor_kind_follows_the_loss_unless_set(
    loss: str, kind: str | None, weight: float, anchor: str, teacher: bool
) -> None:
    cfg = quiet(loss=loss, prefix_loss_kind=kind, prefix_loss_weight=weight)
    assert (cfg.anchor_kind, cfg.needs_teacher) == (anchor, teacher)
    assert cfg.loss_reads_teacher == (loss != "gt")
    with pytest.raises(ValueError, match="prefix_loss_kind"):
        quiet(prefix_loss_kind="kl")


@pytest.mark.parametrize("kind", ["gt", "soft", "hard"])
def test_each_anchor_kind_adds_its_loss_at_the_real_slots(kind: str) -> None:
    """With the student as its own teacher (whose mask token gets no probability): the KL
    anchor to that teacher, the cross-entropy against its argmax, or against the corpus."""
    model = tiny_llama(VOCAB, hidden_size=16, dtype=torch.float64)
    add_mask_token(model)
    mask_id = int(model.config.mtp_mask_token_id)
    layout = training_layout(TrainingLayoutSpec(32, 3, 4, 1))
    windows = np.random.default_rng(0).integers(0, VOCAB, size=(2, layout.spec.window_len))
    losses = {}
    for weight in (0.0, 1.0):
        cfg = quiet(loss="gt", prefix_loss_weight=weight, prefix_loss_kind=kind)
        packed = _pack(
            windows, np.ones(windows.shape, dtype=np.float32), layout, mask_id,
            torch.device("cpu"), prefix_loss=weight > 0,
        )  # fmt: skip
        with torch.no_grad():
            losses[weight] = _batch_loss(
                model, model, model, packed, cfg, mask_id, contextlib.nullcontext()
            ).loss
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(windows[:, : layout.spec.num_real])).logits
    flat = logits.reshape(-1, VOCAB + 1)
    targets = {
        "gt": torch.from_numpy(windows[:, 1 : layout.spec.num_real + 1]).reshape(-1),
        "hard": flat[:, :VOCAB].argmax(-1),
    }
    if kind == "soft":
        teacher = torch.log_softmax(flat[:, :VOCAB], dim=-1)
        student = torch.log_softmax(flat, dim=-1)[:, :VOCAB]
        expected = (teacher.exp() * (teacher - student)).sum(-1).mean()
    else:
        expected = torch.nn.functional.cross_entropy(flat, targets[kind])
    torch.testing.assert_close(losses[1.0] - losses[0.0], expected)


@given(
    k=st.integers(min_value=2, max_value=5),
    num_regions=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_student_forcing_writes_where_the_cores_pairs_say(k: int, num_regions: int, seed: int) -> None:
    """The teacher's input: each region's masks hold the student's tokens of columns 0 .. k-2
    (``mtp_core.student_forcing_pairs``), the mask token never among them."""
    from mtp_torch.training.step import _forced_teacher_input

    seq_len = num_regions * (2 * k) + 4
    layout = training_layout(TrainingLayoutSpec(seq_len, k, num_regions, 0))
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, VOCAB, size=(2, layout.spec.window_len))
    mask_id = VOCAB
    packed = _pack(
        windows, np.ones(windows.shape, dtype=np.float32), layout, mask_id, torch.device("cpu"),
        prefix_loss=False,
    )  # fmt: skip
    logits = torch.from_numpy(rng.standard_normal((2, num_regions, k, VOCAB + 1)))
    logits[..., mask_id] += 100.0  # the student's favourite is the mask token: never written
    forced = _forced_teacher_input(packed, logits, mask_id)
    draft = logits[..., :VOCAB].argmax(-1)
    expected = packed.input_ids.clone()
    for region in range(num_regions):
        for j in range(1, k):
            expected[:, int(layout.predict_index[region, j])] = draft[:, region, j - 1]
    assert torch.equal(forced, expected)


def test_a_model_trained_earlier_in_the_process_can_be_distilled() -> None:
    """Distilling a model that was trained earlier in the process works (resizing a parameter autograd had met must not break the next backward)."""
    teacher = tiny_llama(
        64,
        max_positions=128,
        generation_pad=None,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        seed=None,
    )
    sequences = [[(s + i * d) % 60 for i in range(64)] for s in range(60) for d in range(1, 6)]
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    batch = torch.tensor(sequences[:32])
    teacher(batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    teacher.eval()
    cfg = DistillConfig(k_max=4, steps=2, batch_size=16, seq_len=40, progress=False)
    mtp = distill(teacher, sequences, cfg)
    assert mtp.model.get_input_embeddings().weight.shape[0] == 65
    assert mtp.model.get_output_embeddings().weight.shape[0] == 65


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss stops the run before any update, and no NaN weights are written."""
    import mtp_torch.training.step as distill_module

    calls = {"n": 0}
    real = distill_module._batch_loss

    def poisoned(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] > 4:  # two micro-steps a step: step 3 diverges
            return attrs.evolve(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(distill_module, "_batch_loss", poisoned)
    cfg = _resume_config(tmp_path, 6)
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="diverged at step 3"):
        distill(model, random_corpus(), cfg)
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not caught as an Exception)."""


def test_a_kill_while_replacing_a_checkpoint_keeps_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while re-saving the same step, a run keeps the checkpoint latest.json names and resumes."""
    import mtp_torch.training.checkpoint as checkpoint_module

    corpus = random_corpus()
    distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 2))  # finished: checkpoint of step 2

    real_replace = os.replace

    def killed_moving_a_directory(source: object, target: object) -> None:
        if Path(str(source)).is_dir():
            raise _Killed  # the moment the new checkpoint directory would be put in place
        real_replace(source, target)  # type: ignore[arg-type]

    # Re-running the finished run with --resume saves step 2 again; die mid-save.
    monkeypatch.setattr(checkpoint_module.os, "replace", killed_moving_a_directory)
    with pytest.raises(_Killed):
        distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 2))
    monkeypatch.undo()
    latest = checkpoint_module.latest_checkpoint(tmp_path)
    assert latest is not None and (latest / "model.safetensors").is_file()
    resumed = distill(tiny_gpt2(), corpus, _resume_config(tmp_path, 3))
    assert resumed is not None
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories must not pile up"


def test_a_kill_mid_save_leaves_no_temporary_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtp_torch.training.checkpoint as checkpoint_module

    real_save = checkpoint_module.save_file

    def dies_on_rng(tensors: object, path: str, *args: object, **kwargs: object) -> None:
        if path.endswith("rng.safetensors"):
            raise _Killed
        real_save(tensors, path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint_module, "save_file", dies_on_rng)
    with pytest.raises(_Killed):
        distill(tiny_gpt2(), random_corpus(), _resume_config(tmp_path, 2))
    monkeypatch.undo()
    # A kill leaves its staging directory (the except clause never runs under SIGKILL): fake it.
    (tmp_path / ".checkpoint-00000002.abc.tmp").mkdir(parents=True, exist_ok=True)
    distill(tiny_gpt2(), random_corpus(), _resume_config(tmp_path, 2))
    assert not list(tmp_path.glob(".*tmp*"))


def test_resumed_metrics_log_has_each_step_once(tmp_path: Path) -> None:
    """After a resume, steps after the last checkpoint are logged once, not twice."""
    log = tmp_path / "metrics.jsonl"

    def kill_after_step_3(metrics: object) -> None:
        if metrics.step == 3:
            raise _Killed

    cfg = _resume_config(tmp_path / "ckpt", 4, log_path=str(log))
    with pytest.raises(_Killed):
        distill(tiny_gpt2(), random_corpus(), cfg, on_step=kill_after_step_3)
    distill(tiny_gpt2(), random_corpus(), cfg)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sigterm_ends_the_run_after_the_step_with_a_final_checkpoint(tmp_path: Path) -> None:
    """What a scheduler's SIGTERM (SLURM, ``timeout``, ``docker stop``) does to a run: the step
    in flight finishes, a repeat changes nothing, the checkpoint and the returned model are that
    step's, and the handler that was there before comes back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"

    def term_at_step_2(metrics: StepMetrics) -> None:
        if metrics.step == 2:  # twice, as GNU timeout does (the process, then its group)
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    mtp = distill(
        tiny_llama(VOCAB, hidden_size=16),
        random_corpus(),
        quiet(steps=50, out_dir=str(out), checkpoint_every=100),
        on_step=term_at_step_2,
    )
    assert json.loads((out / "latest.json").read_text())["step"] == 2
    assert mtp.training_summary is not None and mtp.training_summary["steps"] == 2
    assert signal.getsignal(signal.SIGTERM) is before
