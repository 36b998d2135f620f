"""LoRA conversion (peft), prompt-masked corpora and the compact delta that ships a conversion."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_torch import DistillConfig, add_mask_token, distill
from mtp_torch.training.data import Example, TokenStream
from mtp_torch.weights.delta import apply_delta, file_sha256, load_delta, save_delta
from tests.synthetic import make_language, tiny_llama, train_teacher

pytest.importorskip("peft")


def _config(**overrides: object) -> DistillConfig:
    values: dict[str, object] = dict(
        k_max=3, steps=3, seq_len=24, batch_size=4, lr=1e-2, progress=False, device="cpu"
    )
    values.update(overrides)
    return DistillConfig(**values)  # type: ignore[arg-type]


def _corpus() -> list[list[int]]:
    return make_language(vocab_size=32).documents(40, 30, seed=1)


@pytest.mark.parametrize("loss", ["hard", "gt"])
def test_lora_trains_only_adapters_of_the_top_blocks(loss: str) -> None:
    model = tiny_llama(32, layers=3)
    original = copy.deepcopy(model.state_dict())
    mtp = distill(model, _corpus(), _config(lora_rank=4, train_layers=2, loss=loss))
    merged = mtp.model.state_dict()
    assert not any("lora" in name for name in merged), "adapters must be merged on return"
    for name, before in original.items():
        after = merged[name]
        if "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(after[: before.shape[0]], before), name
        elif ".layers.0." in name or "norm" in name and "layers" not in name:
            assert torch.equal(after, before), f"{name} is outside the adapted blocks"
    changed = [n for n in original if ".layers.2." in n and not torch.equal(merged[n], original[n])]
    assert changed, "the top block's linear layers must move"
    assert mtp.delta is not None and any(k.endswith(".up") for k in mtp.delta)


def test_delta_rebuilds_the_merged_model_from_the_base(tmp_path: Path) -> None:
    base = tiny_llama(32, layers=2)
    mtp = distill(copy.deepcopy(base), _corpus(), _config(lora_rank=4, loss="gt", steps=4))
    assert mtp.delta is not None
    path = save_delta(
        tmp_path / "delta.safetensors",
        mtp.delta,
        mask_token_id=mtp.mask_token_id,
        metadata={"k_max": 3},
        dtype=torch.float32,
    )
    tensors, metadata = load_delta(path)
    assert metadata["k_max"] == "3" and int(metadata["mask_token_id"]) == mtp.mask_token_id
    rebuilt = copy.deepcopy(base)
    assert add_mask_token(rebuilt) == mtp.mask_token_id
    apply_delta(rebuilt, tensors, mtp.mask_token_id)
    ids = torch.tensor([[1, 2, 3, mtp.mask_token_id, mtp.mask_token_id]])
    with torch.no_grad():
        expected = mtp.model(ids).logits
        got = rebuilt(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(file_sha256(path)) == 64


def test_corrupt_or_foreign_delta_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_delta(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_delta(junk)
    other = save_delta(
        tmp_path / "other.safetensors",
        {
            "model.layers.9.mlp.up_proj.up": torch.ones(4, 2),
            "model.layers.9.mlp.up_proj.down": torch.ones(2, 4),
        },
        mask_token_id=3,
    )
    tensors, _ = load_delta(other)
    with pytest.raises(ValueError, match="another model"):
        apply_delta(tiny_llama(32, layers=2), tensors, 3)


def test_context_tokens_are_never_targets() -> None:
    stream = TokenStream.from_sequences([Example([5, 6, 7, 8], context_len=2), [9, 10]], seed=0)
    windows, weights, _ = stream.take_weighted(3, 2)
    flat = dict(zip(windows.reshape(-1).tolist(), weights.reshape(-1).tolist(), strict=True))
    assert flat == {5: 0.0, 6: 0.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0}
    with pytest.raises(ValueError, match="context_len"):
        Example([1, 2], context_len=3)


def test_a_fully_context_corpus_learns_nothing() -> None:
    """Weight-0 targets contribute no gradient: the student stays the teacher."""
    language = make_language(vocab_size=32)
    corpus = [Example(doc, context_len=len(doc)) for doc in language.documents(40, 30, seed=1)]
    model = tiny_llama(32, layers=2)
    before = copy.deepcopy(model.state_dict())
    mtp = distill(model, corpus, _config(loss="gt", weight_decay=0.0))
    for name, value in before.items():
        assert torch.equal(mtp.model.state_dict()[name][: value.shape[0]], value), name


@pytest.mark.slow
def test_lora_conversion_of_a_tiny_teacher_decodes_several_tokens_per_forward() -> None:
    from mtp_core import ConfAdapt

    language = make_language(vocab_size=32)
    teacher = train_teacher(language)
    cfg = _config(
        k_max=4,
        steps=300,
        seq_len=64,
        batch_size=16,
        lr=3e-3,
        lora_rank=16,
        lora_alpha=32.0,
        weight_decay=0.0,
        loss="gt",
    )
    mtp = distill(copy.deepcopy(teacher), language.documents(200, 40, seed=5), cfg)
    prompts = torch.tensor([[s, *language.continue_from(s, 3)] for s in range(8)])
    out = mtp.generate(prompts, ConfAdapt(0.9, 4), max_new_tokens=32, eos_token_id=[])
    for row in range(prompts.shape[0]):
        expected = language.continue_from(int(prompts[row, -1]), 32)
        assert out.sequences[row, prompts.shape[1] :].tolist() == expected
    assert out.tokens_per_forward > 2.5


def test_row_aligned_windows_start_at_rows_and_mask_what_follows() -> None:
    rows = [Example([1, 2, 3, 4], context_len=1), Example([5, 6], context_len=0), [7, 8, 9]]
    stream = TokenStream.from_sequences(rows, seed=0)
    starts = {int(stream.tokens[i]) for i in stream.starts}
    assert starts == {1, 5, 7}
    windows, weights, _ = stream.take_weighted(4, 3, row_aligned=True)
    for window, weight in zip(windows.tolist(), weights.tolist(), strict=True):
        assert window[0] in starts
        if window[0] == 1:
            assert weight == [0.0, 1.0, 1.0]  # context, then the row's own targets
        if window[0] == 5:
            assert weight == [1.0, 1.0, 0.0]  # the next row's token only fills the window
    assert stream.epoch == 1  # four windows over three rows wrapped once


def test_confident_targets_weight_only_confident_runs() -> None:
    """Offset j trains fully only where the teacher's tokens 0..j were all confident."""
    import contextlib

    import numpy as np

    from mtp_core._src.layout import TrainingLayoutSpec, training_layout
    from mtp_torch.training.batch import pack_windows as _pack
    from mtp_torch.training.step import _batch_loss

    model = tiny_llama(32, layers=1)
    mask_id = add_mask_token(model)
    layout = training_layout(TrainingLayoutSpec(seq_len=14, k=3, num_regions=2))
    window = np.arange(layout.spec.window_len)[None, :] % 30
    ones = np.ones(window.shape, dtype=np.float32)
    unsure = ones.copy()
    unsure[:, layout.target_index[:, 1]] = 0.1  # every offset-1 target was a guess
    losses = {}
    for name, confidence, cfg_value in [
        ("plain", ones, None),
        ("all sure", ones, 0.5),
        ("gated", unsure, 0.5),
    ]:
        packed = _pack(window, ones, layout, mask_id, torch.device("cpu"), False, confidence)
        cfg = _config(
            loss="gt",
            k_max=3,
            seq_len=14,
            num_regions=2,
            confident_targets=cfg_value,
            unconfident_weight=0.0,
        )
        with torch.no_grad():
            out = _batch_loss(model, model, None, packed, cfg, mask_id, contextlib.nullcontext())
        losses[name], logits, targets = out.loss, out.student_logits, out.targets
    assert torch.allclose(losses["plain"], losses["all sure"])
    # With offsets 1 and 2 gated off, only offset 0 remains.
    offset0 = torch.nn.functional.cross_entropy(
        logits[:, :, 0].reshape(-1, logits.shape[-1]), targets[:, :, 0].reshape(-1)
    )
    assert torch.allclose(losses["gated"], offset0, atol=1e-5)


def test_the_running_acceptance_estimate_follows_confadapt() -> None:
    from mtp_torch.training.step import _confident_run

    sure, unsure = 10.0, 0.0  # logit gaps: softmax top-1 ~1.0 and 0.5 over two tokens
    logits = torch.tensor(
        [[[[sure, 0.0], [sure, 0.0], [unsure, 0.0]], [[unsure, 0.0], [sure, 0.0], [sure, 0.0]]]]
    )
    weights = torch.ones(1, 2, 3)
    assert _confident_run(logits, weights) == pytest.approx((2 + 1) / 2)
    weights[0, 1, 0] = 0.0  # the second region's first target is context: not counted
    assert _confident_run(logits, weights) == pytest.approx(2.0)


def test_the_running_acceptance_estimate_equals_the_old_inline_formula() -> None:
    """The estimate through ``ConfAdapt.accept`` gives the numbers of the rule once coded inline."""
    from mtp_core import ConfAdapt
    from mtp_torch.training.step import ESTIMATE_THRESHOLD, _confident_run

    def old_rule(confidences: torch.Tensor) -> torch.Tensor:
        confident = confidences >= 0.9
        return torch.cumprod(confident.long(), dim=-1).sum(dim=-1).clamp_min(1)

    def old_estimate(student_logits: torch.Tensor, target_weights: torch.Tensor) -> float:
        confidences = torch.softmax(student_logits.float(), dim=-1).amax(dim=-1)
        kept = old_rule(confidences).float()
        counted = target_weights[..., 0] > 0
        return float(kept[counted].mean()) if bool(counted.any()) else 1.0

    assert ESTIMATE_THRESHOLD == 0.9
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(60):
        k = 2 + trial % 7
        # The rule itself, on random confidences around the threshold.
        confidences = 0.8 + 0.2 * torch.rand(64, k, generator=generator)
        new = ConfAdapt(ESTIMATE_THRESHOLD, k).accept(confidences.numpy())
        np.testing.assert_array_equal(new, old_rule(confidences).numpy())
        seen.update(new.tolist())
        # The whole estimate, on random logits (sharp and flat) and random trained targets.
        logits = torch.randn(2, 5, k, 11, generator=generator) * (1 + trial % 5) * 2.0
        weights = (torch.rand(2, 5, k, generator=generator) > 0.3).float()
        assert _confident_run(logits, weights) == old_estimate(logits, weights)
    assert seen == set(range(1, 9))  # every run length occurred: both sides of the threshold
    # The one input where they differ: a float32 confidence of exactly float32(0.9), just below
    # 0.9.  The old rule compared in float32 (kept it); the core compares in float64 (does not),
    # as decoding does, so the estimate now follows decoding there too.
    boundary = torch.full((1, 2), 0.9, dtype=torch.float32)
    assert old_rule(boundary).tolist() == [2]
    assert ConfAdapt(ESTIMATE_THRESHOLD, 2).accept(boundary.numpy()).tolist() == [1]


def test_convert_writes_a_delta_that_rebuilds_the_saved_model(tmp_path: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtp_torch.cli.app import main as cli_main
    from tests.test_distill import _tiny_model_dir

    model_dir = _tiny_model_dir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "what is two plus three the answer five " * 6}) + "\n")
    out, delta = tmp_path / "out", tmp_path / "delta.safetensors"
    args = ["convert", "--model", str(model_dir), "--data", str(data), "--out", str(out)]
    args += ["--k-max", "2", "--seq-len", "16", "--batch-size", "2", "--steps", "2"]
    args += ["--lora-rank", "4", "--delta-out", str(delta), "--no-progress", "--lr", "0.05"]
    assert cli_main(args) == 0
    recorded = (tmp_path / "delta.safetensors.sha256").read_text().split()[0]
    assert recorded == file_sha256(delta)
    tensors, metadata = load_delta(delta)
    assert metadata["k_max"] == "2" and metadata["lora_rank"] == "4"
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    mask_id = add_mask_token(base, AutoTokenizer.from_pretrained(model_dir))
    apply_delta(base, tensors, mask_id)
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, mask_id]])
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, saved(ids).logits, rtol=1e-2, atol=1e-3)


def test_convert_refuses_a_delta_without_lora(tmp_path: Path) -> None:
    from mtp_torch.cli.app import main as cli_main

    args = ["convert", "--lora-rank", "0", "--delta-out", str(tmp_path / "d.safetensors")]
    assert cli_main(args) == 2
