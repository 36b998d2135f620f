"""FlexAttention for the packed layout (``DistillConfig.attention``).

On CUDA the training passes can attend through a FlexAttention block mask built from the
layout's dense mask.  FlexAttention has no backward on the CPU, but its forward runs there, so
the CPU checks that one packed batch gives the same logits through the block mask as through
the dense 4-D mask with SDPA, and how the option resolves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtp_core._src.layout import TrainingLayoutSpec, training_layout
from mtp_torch.decoding.mask import add_mask_token
from mtp_torch.training.batch import forward_logits, pack_windows
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.model_options import (
    FLEX_ATTENTION,
    attention_implementation,
    prepare_model,
    restore_model,
)
from tests.synthetic import tiny_llama

VOCAB = 40
CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only named, never used: the option resolves per device type

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def eager_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers compiles FlexAttention on first use (about 45 s of inductor on this CPU);
    the uncompiled FlexAttention computes the same function, so the tests run that."""
    from transformers.integrations import flex_attention as hf_flex

    def uncompiled(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        training: bool = False,
        **kwargs: object,
    ) -> object:
        return flex_attention.flex_attention(query, key, value, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_packed_logits_through_the_flex_block_mask_equal_the_sdpa_ones(eager_flex: None) -> None:
    sdpa = tiny_llama(VOCAB, hidden_size=32)
    mask_token_id = add_mask_token(sdpa, seed=0)
    flex = tiny_llama(VOCAB, hidden_size=32, attn_implementation=FLEX_ATTENTION)
    add_mask_token(flex, seed=0)
    flex.load_state_dict(sdpa.state_dict())
    assert flex.config._attn_implementation == FLEX_ATTENTION
    # A layout whose regions are not aligned to anything (offset 3) and two different rows.
    layout = training_layout(TrainingLayoutSpec(seq_len=40, k=4, num_regions=4, offset=3))
    rng = np.random.default_rng(0)
    windows = rng.integers(0, VOCAB, size=(2, layout.spec.window_len))
    weights = np.ones(windows.shape, dtype=np.float32)
    packed = pack_windows(windows, weights, layout, mask_token_id, CPU, True, None, True)
    assert packed.block_mask is not None
    # The block mask says exactly what the dense mask says, slot by slot.
    slots = layout.spec.seq_len
    spelled_out = flex_attention.create_mask(packed.block_mask.mask_mod, 1, 1, slots, slots, CPU)
    assert torch.equal(spelled_out[0, 0], packed.allowed[0, 0])
    with torch.no_grad():
        expected = forward_logits(sdpa.eval(), sdpa, packed, packed.input_ids)
        got = forward_logits(flex.eval(), flex, packed, packed.input_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The dense mask really is not causal (a mask never sees another region's masks), so the
    # test would catch a block mask that fell back to plain causal attention.
    causal = torch.tril(torch.ones_like(packed.allowed[0, 0]))
    assert not torch.equal(packed.allowed[0, 0], causal)


def test_attention_option_resolves_per_device_and_model() -> None:
    llama = tiny_llama(VOCAB)
    auto = DistillConfig(attention="auto")
    assert attention_implementation(llama, auto, CPU) == "sdpa"  # CPU: no Flex backward
    assert attention_implementation(llama, auto, CUDA) == FLEX_ATTENTION
    assert attention_implementation(llama, DistillConfig(attention="sdpa"), CUDA) == "sdpa"
    assert attention_implementation(llama, DistillConfig(attention="flex"), CUDA) == FLEX_ATTENTION
    with pytest.raises(ValueError, match="no backward pass on the CPU"):
        attention_implementation(llama, DistillConfig(attention="flex"), CPU)
    llama.config.attention_dropout = 0.1  # transformers' FlexAttention refuses dropout
    assert attention_implementation(llama, auto, CUDA) == "sdpa"
    with pytest.raises(ValueError, match="dropout"):
        attention_implementation(llama, DistillConfig(attention="flex"), CUDA)


def test_heads_narrower_than_flex_kernels_allow_keep_sdpa_or_are_refused() -> None:
    # torch's FlexAttention lowering refuses head dimensions under 16 at its first compiled call
    # (seen on an H200 with a 4-head, 32-wide model): "auto" must not pick it for such a model.
    narrow = tiny_llama(VOCAB, hidden_size=32, heads=4)  # head dim 8
    assert attention_implementation(narrow, DistillConfig(attention="auto"), CUDA) == "sdpa"
    with pytest.raises(ValueError, match="head dimension of at least 16"):
        attention_implementation(narrow, DistillConfig(attention="flex"), CUDA)
    wide = tiny_llama(VOCAB, hidden_size=64, heads=4)  # head dim 16: allowed
    assert attention_implementation(wide, DistillConfig(attention="auto"), CUDA) == FLEX_ATTENTION


def test_a_model_without_flex_support_keeps_sdpa_or_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, attn_implementation="sdpa")
    )
    assert attention_implementation(gpt2, DistillConfig(), CUDA) == "sdpa"
    with pytest.raises(ValueError, match="attention='flex' cannot be used"):
        attention_implementation(gpt2, DistillConfig(attention="flex"), CUDA)


def test_a_model_trained_with_flex_is_switched_back_to_sdpa() -> None:
    model = tiny_llama(VOCAB)
    prepare_model(model, DistillConfig(attention="flex"), CUDA)  # sets the kernel only
    assert model.config._attn_implementation == FLEX_ATTENTION
    restore_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_attention_choice_is_validated() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        DistillConfig(attention="flash")  # type: ignore[arg-type]
