"""Mask-gated adapters: real rows stay bitwise the base model's; mask rows learn; save and load."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtp_core import ConfAdapt, StaticK
from mtp_torch import DistillConfig, MTPModel, add_mask_token, distill
from mtp_torch.decoding.gated import (
    GATE_FILE,
    add_mask_gate,
    find_mask_gate,
    gated_layers,
    plain_layers,
)
from mtp_torch.training.batch import draw_batch
from mtp_torch.training.data import TokenStream
from mtp_torch.training.state import init_train_state
from mtp_torch.training.step import train_step
from mtp_torch.weights.delta import apply_delta, gated_delta, load_delta, save_delta
from tests.strategies import policies, prompt_batches
from tests.synthetic import make_language, tiny_llama, train_teacher
from tests.test_torch_decode import (
    ARCHITECTURES,
    PAD,
    VOCAB,
    greedy_reference,
    left_pad,
    logit_bias_hook,
    tiny_model,
)


def _randomise(model: Any, seed: int = 1) -> None:
    """Nonzero adapters and a random mask vector, as after training."""
    generator = torch.Generator().manual_seed(seed)
    gate = find_mask_gate(model)
    assert gate is not None
    with torch.no_grad():
        for _, layer in gated_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        gate.mask_embedding.copy_(torch.randn(gate.mask_embedding.shape, generator=generator))


_PAIRS: dict[str, tuple[Any, Any, int]] = {}


def gated_pair(name: str) -> tuple[Any, Any, int]:
    """(base with a mask token, the same gated with trained-looking adapters, mask id)."""
    if name not in _PAIRS:
        base = tiny_model(name)
        mask_token_id = add_mask_token(base)
        gated = copy.deepcopy(base)
        add_mask_gate(gated, mask_token_id, rank=4)
        _randomise(gated)
        # A random model may emit the new mask id as a real token; a gated model reads every
        # mask id as a mask slot, so keep both models from ever choosing it.
        for model in (base, gated):
            model.get_output_embeddings().register_forward_hook(
                logit_bias_hook(mask_token_id, -1e9)
            )
        _PAIRS[name] = (base.eval(), gated.eval(), mask_token_id)
    return _PAIRS[name]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_real_rows_are_bitwise_the_base_models(name: str, data: st.DataObject) -> None:
    """Every non-mask row's logits equal the base model's exactly; mask rows differ."""
    base, gated, mask_token_id = gated_pair(name)
    prompts = data.draw(prompt_batches(VOCAB, max_batch=3, max_len=8), label="prompts")
    masks = data.draw(st.integers(0, 3), label="masks")
    ids, attention = left_pad(prompts)
    ids = torch.cat([ids, torch.full((ids.shape[0], masks), mask_token_id)], dim=1)
    attention = torch.cat([attention, torch.ones(ids.shape[0], masks, dtype=torch.long)], dim=1)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=attention).logits
        got = gated(input_ids=ids, attention_mask=attention).logits
    real = ids != mask_token_id
    assert torch.equal(got[real], expected[real])
    if masks:
        assert not torch.equal(got[~real], expected[~real])


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_static_one_and_verify_give_the_base_models_greedy_tokens(
    name: str, data: st.DataObject
) -> None:
    base, gated, mask_token_id = gated_pair(name)
    prompts = data.draw(prompt_batches(VOCAB, max_batch=3, max_len=8), label="prompts")
    max_new_tokens = data.draw(st.integers(1, 10), label="max_new_tokens")
    ids, attention = left_pad(prompts)
    reference = greedy_reference(base, ids, attention, max_new_tokens, None)
    mtp = MTPModel(gated, mask_token_id=mask_token_id)
    for policy, verify in [(StaticK(1), False), (data.draw(policies, label="policy"), True)]:
        out = mtp.generate(
            ids,
            policy=policy,
            max_new_tokens=max_new_tokens,
            attention_mask=attention,
            verify=verify,
            pad_token_id=PAD,
        )
        assert torch.equal(out.sequences, reference), (policy, verify)


def test_the_linear_kernel_still_runs_the_base_product() -> None:
    """skinny_linear swaps plain nn.Linear modules: a gate keeps them plain inside."""
    from mtp_torch import skinny_linear

    _, gated, _ = gated_pair("llama")
    with skinny_linear(gated) as switched:
        assert switched == len(list(gated_layers(gated))) + 1  # the output layer too


def test_two_models_and_copies_do_not_share_mask_rows() -> None:
    base, gated, mask_token_id = gated_pair("llama")
    other = copy.deepcopy(gated)
    _randomise(other, seed=7)
    ids = torch.tensor([[3, 4, mask_token_id, mask_token_id]])
    with torch.no_grad():
        first = gated(ids).logits
        plain = base(torch.tensor([[3, 4, 5]])).logits  # leaves nothing behind for the others
        second = other(ids).logits
        again = gated(ids).logits
    assert torch.equal(first, again) and not torch.equal(first[0, 2:], second[0, 2:])
    assert plain.shape[1] == 3


def test_gradients_reach_only_the_gate() -> None:
    model = tiny_llama(32, layers=2)
    cfg = DistillConfig(
        k_max=3, steps=1, seq_len=24, batch_size=2, lr=1e-2, lora_rank=4, lora_gate="mask",
        loss="gt", progress=False, device="cpu",
    )  # fmt: skip
    before = {name: value.clone() for name, value in model.state_dict().items()}
    state = init_train_state(model, None, cfg, torch.device("cpu"))
    stream = TokenStream.from_sequences(make_language(32).documents(20, 30, seed=1))
    batch = draw_batch(
        state.generator, stream, cfg, mask_token_id=state.mask_token_id, device=torch.device("cpu")
    )
    trainable = {id(p) for p in state.trainable}
    gate = find_mask_gate(state.student)
    assert gate is not None and {id(gate.mask_embedding)} <= trainable
    for packed in batch:  # one backward, then look at where gradients went
        from mtp_torch.training.step import _micro_step

        _micro_step(state, packed, sync=True)
    for name, parameter in state.student.named_parameters():
        has_grad = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
        assert has_grad == (id(parameter) in trainable and "lora_A" not in name), name
    state.optimizer.zero_grad()
    train_step(state, batch)
    with plain_layers(state.student):
        after = state.student.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name][: value.shape[0]], value), f"{name} moved"


def _trained_gated_model(steps: int = 3) -> tuple[Any, MTPModel]:
    base = tiny_llama(32, layers=2, tie=True)
    cfg = DistillConfig(
        k_max=3, steps=steps, seq_len=24, batch_size=4, lr=1e-2, lora_rank=4, lora_gate="mask",
        loss="hard", progress=False, device="cpu",
    )  # fmt: skip
    mtp = distill(copy.deepcopy(base), make_language(32).documents(40, 30, seed=1), cfg)
    add_mask_token(base)
    return base, mtp


def test_save_load_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, mtp = _trained_gated_model()
    assert mtp.gate is not None and mtp.delta is not None
    path = mtp.save_pretrained(tmp_path / "gated")
    assert (path / GATE_FILE).is_file()
    assert json.loads((path / "config.json").read_text())["mtp_gate"]["kind"] == "mask"
    assert "AutoModelForCausalLM" in (path / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(path)
    for name, value in base.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name
    loaded = MTPModel.from_pretrained(path)
    assert loaded.gate is not None
    ids = torch.tensor([[1, 2, 3, mtp.mask_token_id, mtp.mask_token_id]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, mtp.model(ids).logits)
        assert torch.equal(plain(ids).logits[0, :3], base(ids).logits[0, :3])
    (path / GATE_FILE).write_bytes(b"\x00broken")
    with pytest.raises(ValueError, match="corrupt"):
        MTPModel.from_pretrained(path)
    (path / GATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=GATE_FILE):
        MTPModel.from_pretrained(path)


def _saved_gated_delta(tmp_path: Path) -> tuple[Any, MTPModel, Path]:
    """A trained gated model, its base, and its delta saved in float32 (as ``--delta-out``)."""
    base, mtp = _trained_gated_model()
    gate = mtp.gate
    assert gate is not None and mtp.delta is not None
    from mtp_torch.decoding.gated import gate_settings

    path = save_delta(
        tmp_path / "d.safetensors",
        mtp.delta,
        mask_token_id=mtp.mask_token_id,
        metadata={"gate": json.dumps(gate_settings(gate))},
        dtype=torch.float32,
    )
    return base, mtp, path


def test_a_gated_delta_rebuilds_the_gated_model(tmp_path: Path) -> None:
    base, mtp, path = _saved_gated_delta(tmp_path)
    tensors, metadata = load_delta(path)
    rebuilt = copy.deepcopy(base)
    apply_delta(rebuilt, tensors, mtp.mask_token_id, json.loads(metadata["gate"]))
    ids = torch.tensor([[1, 2, 3, mtp.mask_token_id, mtp.mask_token_id]])
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, mtp.model(ids).logits)
    with pytest.raises(ValueError, match="gate settings"):
        apply_delta(copy.deepcopy(base), tensors, mtp.mask_token_id)
    assert set(gated_delta(mtp.model, mtp.mask_token_id)) == set(tensors)


def test_a_conversion_continues_from_a_gated_delta(tmp_path: Path) -> None:
    base, mtp, path = _saved_gated_delta(tmp_path)
    documents = make_language(32).documents(40, 30, seed=1)
    fresh = tiny_llama(32, layers=2, tie=True)  # seeded: the weights ``mtp`` started from
    cfg = DistillConfig(
        k_max=3, steps=1, seq_len=24, batch_size=4, lr=1e-12, warmup_steps=0, lora_rank=4,
        lora_gate="mask", loss="hard", progress=False, device="cpu", init_delta=str(path),
    )  # fmt: skip
    continued = distill(copy.deepcopy(fresh), documents, cfg)
    ids = torch.tensor([[1, 2, 3, mtp.mask_token_id, mtp.mask_token_id]])
    with torch.no_grad():
        started, trained = continued.model(ids).logits, mtp.model(ids).logits
    torch.testing.assert_close(started, trained, rtol=1e-5, atol=1e-5)
    # From zero adapters (no delta) the mask rows are not the trained model's.
    zero = distill(copy.deepcopy(fresh), documents, attrs.evolve(cfg, init_delta=None))
    with torch.no_grad():
        assert not torch.allclose(zero.model(ids).logits[0, 3:], trained[0, 3:], atol=1e-3)
    with pytest.raises(ValueError, match="rank"):
        distill(copy.deepcopy(fresh), documents, attrs.evolve(cfg, lora_rank=8))
    with pytest.raises(ValueError, match="lora_gate"):
        DistillConfig(lora_rank=4, init_delta=str(path))


def test_gate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="lora_rank"):
        DistillConfig(lora_gate="mask", lora_rank=0)
    with pytest.raises(ValueError, match="prefix_loss_weight"):
        DistillConfig(lora_gate="mask", lora_rank=4, prefix_loss_weight=1.0)
    with pytest.raises(ValueError, match="lora_gate"):
        DistillConfig(lora_gate="heads", lora_rank=4)  # type: ignore[arg-type]
    from mtp_torch.training.config import cpu_preset

    preset = cpu_preset(lora_gate="mask")
    assert preset.loss == "gt" and preset.train_layers is None and preset.prefix_loss_weight == 0


@pytest.mark.slow
def test_gated_conversion_learns_while_one_token_decoding_stays_the_teachers() -> None:
    language = make_language(vocab_size=32)
    teacher = train_teacher(language)
    cfg = DistillConfig(
        k_max=4, steps=250, seq_len=64, batch_size=16, lr=3e-3, lora_rank=16, lora_alpha=32.0,
        weight_decay=0.0, loss="gt", lora_gate="mask", progress=False, device="cpu",
    )  # fmt: skip
    mtp = distill(copy.deepcopy(teacher), language.documents(200, 40, seed=5), cfg)
    add_mask_token(teacher)
    prompts = torch.tensor([[s, *language.continue_from(s, 3)] for s in range(8)])
    one = mtp.generate(prompts, StaticK(1), max_new_tokens=24, eos_token_id=[])
    with torch.no_grad():
        reference = teacher.generate(
            prompts, do_sample=False, max_new_tokens=24, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(one.sequences, reference)
    fast = mtp.generate(prompts, ConfAdapt(0.9, 4), max_new_tokens=24, eos_token_id=[])
    assert fast.tokens_per_forward > 2.0
    verified = mtp.generate(
        prompts, ConfAdapt(0.9, 4), max_new_tokens=24, eos_token_id=[], verify=True
    )
    assert torch.equal(verified.sequences, reference)
    assert verified.tokens_per_forward > 1.5


def test_saving_never_unwraps_the_live_model_while_another_thread_decodes(tmp_path: Path) -> None:
    """Saving reads the model only: a thread decoding the same gated model meanwhile always
    gets its adapters' tokens, and the save still loads as the exact base model."""
    import threading

    from transformers import AutoModelForCausalLM

    base, gated, mask_token_id = gated_pair("llama")
    mtp = MTPModel(gated, mask_token_id)
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    policy = StaticK(3)
    expected = mtp.generate(prompt, policy=policy, max_new_tokens=12).sequences
    plain_tokens = MTPModel(copy.deepcopy(base), mask_token_id).generate(
        prompt, policy=policy, max_new_tokens=12
    )
    assert not torch.equal(plain_tokens.sequences, expected)  # the adapters matter here
    stop, errors = threading.Event(), []

    def save_repeatedly() -> None:
        try:
            while not stop.is_set():
                mtp.save_pretrained(tmp_path / "gated", overwrite=True)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    saver = threading.Thread(target=save_repeatedly)
    saver.start()
    try:
        for _ in range(40):
            assert torch.equal(
                mtp.generate(prompt, policy=policy, max_new_tokens=12).sequences, expected
            )
    finally:
        stop.set()
        saver.join()
    assert not errors
    assert find_mask_gate(gated) is not None
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "gated")
    for name, value in base.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name
