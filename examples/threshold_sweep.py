"""Sweep the ConfAdapt threshold: tokens per forward pass against agreement with greedy decoding.

ConfAdapt keeps the longest prefix of the ``k_max`` proposals whose top-1 probability clears the
threshold, so a lower threshold keeps more tokens per pass and strays further from what greedy
decoding would have written (the paper sweeps 0.995 ... 0.6; Kirchenbauer et al., arXiv
2602.06019, section 4).  The lossless mode (``verify=True``) never strays: it checks the
proposals with the same weights, so its agreement is always 100%.

The model is a tiny random Llama, never distilled, so its mask positions are poor predictors and
agreement drops fast; on a converted model (``mtp convert``, then the same loop) the curve is the
paper's: several tokens per pass at a small cost in quality.

Run:  python examples/threshold_sweep.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_torch import ConfAdapt, MTPModel, StaticK

THRESHOLDS = (0.99, 0.9, 0.7, 0.5, 0.3)
K_MAX = 8
MAX_NEW_TOKENS = 32


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama in float64 with peaked (confident) output distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = 0
    return model


def agreement(sequences: torch.Tensor, reference: torch.Tensor, prompt_len: int) -> float:
    """Fraction of generated positions equal to the reference's token at the same position."""
    return float((sequences[:, prompt_len:] == reference[:, prompt_len:]).double().mean())


def main() -> None:
    mtp = MTPModel(tiny_llama())
    prompts = torch.randint(1, 96, (8, 6), generator=torch.Generator().manual_seed(0))
    prompt_len = prompts.shape[1]
    settings = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[])
    greedy = mtp.generate(prompts, StaticK(1), **settings)

    header = ("threshold", "tokens/forward", "agreement", "verify: tokens/forward")
    print(f"{header[0]:>9}  {header[1]:>14}  {header[2]:>9}  {header[3]:>22}")
    rates = []
    for threshold in THRESHOLDS:
        policy = ConfAdapt(threshold=threshold, k_max=K_MAX)
        out = mtp.generate(prompts, policy, **settings)
        checked = mtp.generate(prompts, policy, verify=True, **settings)
        assert torch.equal(checked.sequences, greedy.sequences)  # lossless at every threshold
        rates.append(out.tokens_per_forward)
        print(
            f"{threshold:>9.2f}  {out.tokens_per_forward:>14.2f}  "
            f"{agreement(out.sequences, greedy.sequences, prompt_len):>9.0%}  "
            f"{checked.tokens_per_forward:>22.2f}"
        )
    # A lower threshold never keeps fewer tokens per step for the same proposals; over whole
    # generations it may wobble slightly, so only the ends are compared.
    assert rates[-1] > rates[0], "a looser threshold should accept more tokens per pass"


if __name__ == "__main__":
    main()
