"""Convert a tiny model into a multi-token predictor by self-distillation, end to end on a CPU.

The steps are those of ``mtp convert`` on a real model, shrunk to a toy that trains in seconds:

1. a toy language: a fixed random permutation ``successor`` of 32 token ids; every document
   follows it (``t, successor[t], successor[successor[t]], ...``);
2. a tiny Llama learns it by ordinary next-token training; this is the model to convert (in
   practice: any pretrained causal LM);
3. ``distill`` adds the ``<mtp_mask>`` token and fine-tunes the model against a frozen copy of
   itself (student forcing, hard-teacher loss; Kirchenbauer et al., arXiv 2602.06019);
4. the converted model decodes several tokens per forward pass with ConfAdapt, and its output
   is still the teacher's continuation;
5. ``save_pretrained`` writes a plain transformers checkpoint, which ``MTPModel.from_pretrained``
   restores with its mask token id and default policy.

Run:  python examples/convert_tiny_model.py
"""

from __future__ import annotations

import copy
import tempfile

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from mtp_torch import ConfAdapt, DistillConfig, MTPModel, distill

VOCAB = 32


def successor_documents(
    successor: np.ndarray, count: int, length: int, seed: int
) -> list[list[int]]:
    """``count`` documents of the toy language, each from a random first token."""
    rng = np.random.default_rng(seed)
    documents = []
    for start in rng.integers(0, len(successor), size=count):
        document = [int(start)]
        while len(document) < length:
            document.append(int(successor[document[-1]]))
        documents.append(document)
    return documents


def train_next_token_model(successor: np.ndarray, steps: int = 150) -> LlamaForCausalLM:
    """A tiny Llama trained by next-token cross-entropy on the toy language."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.tensor(successor_documents(successor, steps * 32, 32, seed=1))
    for batch in data.split(32):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    transformers.utils.logging.disable_progress_bar()  # quiet saving/loading
    # 1-2. The model to convert.
    successor = np.random.default_rng(0).permutation(VOCAB)
    model = train_next_token_model(successor)
    prompts = torch.tensor([[s, int(successor[s])] for s in range(8)])
    expected = []  # the language's true continuation of each prompt
    for row in prompts.tolist():
        continuation, token = [], row[-1]
        for _ in range(24):
            token = int(successor[token])
            continuation.append(token)
        expected.append(continuation)
    policy = ConfAdapt(threshold=0.9, k_max=4)

    untrained = MTPModel(copy.deepcopy(model))  # a mask token added, no distillation
    before = untrained.generate(prompts, policy, max_new_tokens=24, eos_token_id=[])
    print(f"before distillation: {before.tokens_per_forward:.2f} tokens/forward")

    # 3. Self-distillation (the teacher is a frozen copy of `model` as passed).
    corpus = successor_documents(successor, 200, 40, seed=5)
    cfg = DistillConfig(
        k_max=4,
        steps=150,
        seq_len=64,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        device="cpu",
        progress=False,
        seed=0,
    )
    mtp = distill(model, corpus, cfg)

    # 4. Several tokens per forward pass, same continuation.
    after = mtp.generate(prompts, policy, max_new_tokens=24, eos_token_id=[])
    generated = after.sequences[:, prompts.shape[1] :].tolist()
    correct = np.mean([g == e for g, e in zip(generated, expected, strict=True)])
    print(
        f"after distillation:  {after.tokens_per_forward:.2f} tokens/forward, "
        f"{correct:.0%} of rows continue the language exactly"
    )

    # 5. Save and restore: a plain transformers checkpoint plus the MTP settings.
    with tempfile.TemporaryDirectory() as directory:
        path = mtp.save_pretrained(f"{directory}/tiny-mtp", k_max=4, threshold=0.9)
        restored = MTPModel.from_pretrained(path)
        again = restored.generate(prompts, max_new_tokens=24, eos_token_id=[])  # stored policy
        assert restored.mask_token_id == mtp.mask_token_id
        assert torch.equal(again.sequences, after.sequences)
        print(f"saved to and restored from {path.name}/ (mask token id {restored.mask_token_id})")


if __name__ == "__main__":
    main()
