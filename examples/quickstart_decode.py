"""Quickstart: decode several tokens per forward pass with ``MTPModel``.

A tiny randomly initialised Llama stands in for a real checkpoint (no download, seconds on a
CPU).  Its weights are random and it was never distilled, so its mask positions are rarely
confident and it accepts little more than one token per pass (``convert_tiny_model.py`` shows
the gain after distillation); but every decoding mode runs exactly as on a converted model:

1. wrap the transformers model in ``MTPModel`` (this adds the ``<mtp_mask>`` token);
2. decode with ConfAdapt (the paper's adaptive policy) and report tokens per forward pass;
3. decode with ``verify=True`` (the lossless mode) and check that the output equals
   transformers' own greedy ``generate`` token for token.

Run:  python examples/quickstart_decode.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_torch import ConfAdapt, MTPModel, StaticK


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, in float64 so that argmax ties cannot flip."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Large initial weights give peaked (confident) next-token distributions, so ConfAdapt
        # has something to accept even though the model was never trained.
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = 0
    return model


def main() -> None:
    model = tiny_llama()
    prompts = torch.tensor([[5, 17, 42, 8, 23], [61, 2, 2, 90, 14]])
    max_new_tokens = 32
    no_stop: list[int] = []  # random weights: do not stop on an accidental EOS

    # 1. Wrap.  mask_token_id=None adds <mtp_mask> (or reads it from a converted config).
    mtp = MTPModel(model)
    print(f"mask token id: {mtp.mask_token_id}")

    # 2. The paper's decoding: keep the longest prefix of proposals with confidence >= 0.9.
    out = mtp.generate(
        prompts,
        policy=ConfAdapt(threshold=0.9, k_max=8),
        max_new_tokens=max_new_tokens,
        eos_token_id=no_stop,
    )
    print(
        f"ConfAdapt(0.9, k_max=8): {out.num_forward_passes} forward passes for "
        f"{max_new_tokens} tokens per row, {out.tokens_per_forward:.2f} tokens/forward"
    )

    # 3. Lossless mode: the same weights verify their own proposals.
    verified = mtp.generate(
        prompts,
        policy=ConfAdapt(threshold=0.9, k_max=8),
        max_new_tokens=max_new_tokens,
        eos_token_id=no_stop,
        verify=True,
    )
    with torch.no_grad():
        reference = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
        )
    assert torch.equal(verified.sequences, reference), "verify=True must equal greedy decoding"
    print(
        f"verify=True equals greedy generate: {verified.num_forward_passes} forward passes "
        f"(plain greedy: {max_new_tokens}), {verified.tokens_per_forward:.2f} tokens/forward"
    )

    # StaticK(1) is plain one-token-at-a-time decoding, also equal to greedy.
    single = mtp.generate(
        prompts, policy=StaticK(1), max_new_tokens=max_new_tokens, eos_token_id=no_stop
    )
    assert torch.equal(single.sequences, reference)
    print("StaticK(1) equals greedy generate")


if __name__ == "__main__":
    main()
