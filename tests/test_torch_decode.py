"""mtp_torch decoding: TorchBackend + MTPModel against transformers' own greedy search.

All models are tiny, random and float64, so argmax ties cannot flip between two ways of
computing the same logits.  Nothing here touches the network.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from mtp_core import ConfAdapt, StaticK, StepInputs
from mtp_core import Sampling as CoreSampling
from mtp_torch import MTPModel, TorchBackend
from tests.strategies import policies, prompt_batches

VOCAB = 96
PAD = 0
CONTEXT = 128

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
_DECODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
)

ARCHITECTURES: dict[str, Callable[[float], Any]] = {
    "llama": lambda init: LlamaForCausalLM(
        LlamaConfig(**_COMMON, **_DECODER, initializer_range=init)
    ),
    "mistral": lambda init: MistralForCausalLM(
        MistralConfig(**_COMMON, **_DECODER, initializer_range=init, sliding_window=4096)
    ),
    "qwen2": lambda init: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, **_DECODER, initializer_range=init)
    ),
    "qwen3": lambda init: Qwen3ForCausalLM(
        Qwen3Config(**_COMMON, **_DECODER, head_dim=8, initializer_range=init)
    ),
    "phi3": lambda init: Phi3ForCausalLM(Phi3Config(**_COMMON, **_DECODER, initializer_range=init)),
    "gemma": lambda init: GemmaForCausalLM(
        GemmaConfig(**_COMMON, **_DECODER, head_dim=8, initializer_range=init)
    ),
    "gpt2": lambda init: GPT2LMHeadModel(
        GPT2Config(
            **_COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=CONTEXT, initializer_range=init
        )
    ),
}


def tiny_model(name: str, init: float = 0.5, seed: int = 0) -> Any:
    """A float64 random model whose generation config has no EOS (tests pass it explicitly)."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[name](init).to(torch.float64).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


_MODELS: dict[tuple[str, float], Any] = {}


def cached_model(name: str, init: float = 0.5) -> Any:
    """Build each tiny model once per session (hypothesis examples share it, read-only)."""
    if (name, init) not in _MODELS:
        _MODELS[(name, init)] = tiny_model(name, init)
    return _MODELS[(name, init)]


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(batch, max_len)`` ids and attention mask, like a tokenizer would give."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def greedy_reference(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int | None
) -> torch.Tensor:
    """transformers' own greedy search."""
    # eos=None means "the generation config's EOS" (passing None explicitly would disable it).
    stop = {} if eos is None else {"eos_token_id": eos}
    with torch.no_grad():
        out: torch.Tensor = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=PAD,
            **stop,
        )
    return out


def logit_bias_hook(token: int, bias: float) -> Callable[..., torch.Tensor]:
    """A forward hook on the LM head adding ``bias`` to one token's logit (both decoders see it).

    It makes a random model propose ``token`` often but not always, so that drafts match the
    greedy continuation part of the time (ragged verification) while context still matters.
    """

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., token] += bias
        return output

    return hook


# --- equivalence with transformers' greedy search ------------------------------------------------


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@settings(max_examples=15)
@given(data=st.data())
def test_static_one_and_verify_equal_greedy(name: str, data: st.DataObject) -> None:
    """StaticK(1) and verify=True reproduce model.generate(do_sample=False) exactly."""
    model = cached_model(name)
    prompts = data.draw(prompt_batches(VOCAB, max_batch=3, max_len=8), label="prompts")
    max_new_tokens = data.draw(st.integers(1, 12), label="max_new_tokens")
    mask_token_id = data.draw(st.integers(0, VOCAB - 1), label="mask_token_id")
    ids, mask = left_pad(prompts)
    reference = greedy_reference(model, ids, mask, max_new_tokens, None)
    eos = None
    if data.draw(st.booleans(), label="with_eos"):
        # An EOS that fires: a token the greedy continuation of row 0 actually emits.
        generated = reference[0, ids.shape[1] :].tolist()
        eos = int(data.draw(st.sampled_from(generated), label="eos"))
        reference = greedy_reference(model, ids, mask, max_new_tokens, eos)
    mtp = MTPModel(model, mask_token_id=mask_token_id)
    for policy, verify in [(StaticK(1), False), (data.draw(policies, label="policy"), True)]:
        out = mtp.generate(
            ids,
            policy=policy,
            max_new_tokens=max_new_tokens,
            attention_mask=mask,
            eos_token_id=eos,
            verify=verify,
        )
        assert torch.equal(out.sequences, reference), (policy, verify)


@settings(max_examples=40)
@given(
    prompts=prompt_batches(VOCAB, max_batch=3, max_len=10),
    policy=policies,
    max_new_tokens=st.integers(1, 30),
    bias=st.floats(0.0, 25.0),
)
def test_verify_equals_greedy_with_ragged_matches(
    prompts: list[list[int]], policy: Any, max_new_tokens: int, bias: float
) -> None:
    """verify=True stays exact when drafts match partly (a logit bias makes matches common)."""
    model = cached_model("llama", init=1.0)
    handle = model.lm_head.register_forward_hook(logit_bias_hook(7, bias))
    try:
        ids, mask = left_pad(prompts)
        reference = greedy_reference(model, ids, mask, max_new_tokens, None)
        out = MTPModel(model, mask_token_id=5).generate(
            ids, policy=policy, max_new_tokens=max_new_tokens, attention_mask=mask, verify=True
        )
    finally:
        handle.remove()
    assert torch.equal(out.sequences, reference)


def test_verify_reaches_multi_token_steps() -> None:
    """The biased model really accepts several drafts in one pass (guards the test above)."""
    model = cached_model("llama", init=1.0)
    handle = model.lm_head.register_forward_hook(logit_bias_hook(7, 17.0))
    try:
        ids, mask = left_pad([[1, 2, 3], [4, 5], [9, 8, 7, 6]])
        reference = greedy_reference(model, ids, mask, 40, None)
        out = MTPModel(model, mask_token_id=5).generate(
            ids, policy=StaticK(4), max_new_tokens=40, attention_mask=mask, verify=True
        )
    finally:
        handle.remove()
    assert torch.equal(out.sequences, reference)
    histogram = out.accepted_histogram
    assert histogram[1] > 0 and histogram[2:].sum() > 0, histogram
    assert out.num_forward_passes < 40


# --- batched decoding equals one-by-one ------------------------------------------------------------


@settings(max_examples=30)
@given(
    prompts=prompt_batches(VOCAB, max_batch=3, max_len=10),
    policy=policies,
    max_new_tokens=st.integers(1, 40),
    mask_token_id=st.integers(0, VOCAB - 1),
)
def test_batched_equals_one_by_one(
    prompts: list[list[int]], policy: Any, max_new_tokens: int, mask_token_id: int
) -> None:
    """Without verification, each row of a batch decodes as it would alone (ragged steps)."""
    model = cached_model("llama", init=1.0)
    mtp = MTPModel(model, mask_token_id=mask_token_id)
    ids, mask = left_pad(prompts)
    batched = mtp.generate(ids, policy=policy, max_new_tokens=max_new_tokens, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone_ids = torch.tensor([prompt])
        alone = mtp.generate(
            alone_ids,
            policy=policy,
            max_new_tokens=max_new_tokens,
            attention_mask=torch.ones_like(alone_ids),
        )
        count = int(alone.num_new_tokens[0])
        assert batched.num_new_tokens[row] == count
        expected = alone.sequences[0, len(prompt) :]
        got = batched.sequences[row, ids.shape[1] : ids.shape[1] + count]
        assert torch.equal(got, expected)
        assert torch.all(batched.sequences[row, ids.shape[1] + count :] == PAD)


def test_holes_and_compaction_paths_are_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ragged ConfAdapt acceptance in a batch of 3 builds holes and compacts the cache."""
    model = cached_model("llama", init=1.0)
    mtp = MTPModel(model, mask_token_id=50)
    calls: list[bool] = []
    original = TorchBackend.reindex

    def spy(self: TorchBackend, cache: Any, rows: Any, slots: Any) -> Any:
        calls.append(slots is not None)
        return original(self, cache, rows, slots)

    monkeypatch.setattr(TorchBackend, "reindex", spy)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    ids, mask = left_pad(prompts)
    policy = ConfAdapt(threshold=0.5, k_max=8)
    eos = 11
    batched = mtp.generate(
        ids, policy=policy, max_new_tokens=110, attention_mask=mask, eos_token_id=eos
    )
    histogram = batched.accepted_histogram
    assert np.count_nonzero(histogram[1:]) >= 3, histogram  # ragged acceptance
    assert any(calls), "the cache was never compacted"
    for row, prompt in enumerate(prompts):
        alone_ids = torch.tensor([prompt])
        alone = mtp.generate(
            alone_ids,
            policy=policy,
            max_new_tokens=110,
            attention_mask=torch.ones_like(alone_ids),
            eos_token_id=eos,
        )
        count = int(alone.num_new_tokens[0])
        assert torch.equal(
            batched.sequences[row, ids.shape[1] : ids.shape[1] + count],
            alone.sequences[0, len(prompt) :],
        )


def test_backend_with_holes_matches_a_fresh_forward() -> None:
    """Logit read-outs over a cache with holes and after compaction equal a full recompute."""
    model = cached_model("qwen3", init=1.0)
    backend = TorchBackend(model)
    sampling = CoreSampling()

    def fresh_confidences(tokens: list[int]) -> tuple[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0, -1]
        probabilities = torch.softmax(logits, dim=-1)
        return int(probabilities.argmax()), float(probabilities.max())

    cache = backend.new_cache(2)
    # Step 1: prompts of lengths 3 and 2, right-padded.
    step = StepInputs(
        token_ids=np.array([[5, 6, 7], [8, 9, PAD]]),
        position_ids=np.array([[0, 1, 2], [0, 1, 1]]),
        attention_mask=np.array([[1, 1, 1], [1, 1, 0]], dtype=bool),
        read_index=np.array([[2], [1]]),
    )
    outputs, cache = backend.forward(cache, step, sampling, 0)
    assert backend.cache_length(cache) == 3
    # Row 1's third slot is a hole.  Step 2 adds two tokens per row.
    visible = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
    step = StepInputs(
        token_ids=np.array([[10, 11], [12, 13]]),
        position_ids=np.array([[3, 4], [2, 3]]),
        attention_mask=np.concatenate([visible, np.ones((2, 2), dtype=bool)], axis=1),
        read_index=np.array([[0, 1], [0, 1]]),
    )
    outputs, cache = backend.forward(cache, step, sampling, 0)
    sequences = [[5, 6, 7, 10, 11], [8, 9, 12, 13]]
    for row, tokens in enumerate(sequences):
        for read, end in enumerate((len(tokens) - 1, len(tokens))):
            token, confidence = fresh_confidences(tokens[:end])
            assert outputs.tokens[row, read] == token
            assert outputs.confidences[row, read] == pytest.approx(confidence, abs=1e-10)
    # Compact: keep row 1 only, its visible slots right-aligned after a filler slot.
    cache = backend.reindex(cache, np.array([1]), np.array([[0, 0, 1, 3, 4]]))
    step = StepInputs(
        token_ids=np.array([[14]]),
        position_ids=np.array([[4]]),
        attention_mask=np.array([[0, 1, 1, 1, 1, 1]], dtype=bool),
        read_index=np.array([[0]]),
    )
    outputs, cache = backend.forward(cache, step, sampling, 0)
    token, confidence = fresh_confidences([8, 9, 12, 13, 14])
    assert outputs.tokens[0, 0] == token
    assert outputs.confidences[0, 0] == pytest.approx(confidence, abs=1e-10)
    cache = backend.crop(cache, 4)
    assert backend.cache_length(cache) == 4


# --- sampling --------------------------------------------------------------------------------------


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), policy=policies)
def test_sampling_is_reproducible(seed: int, policy: Any) -> None:
    """The same seed gives the same sample; top_k=1 sampling is greedy decoding."""
    model = cached_model("llama", init=1.0)
    mtp = MTPModel(model, mask_token_id=3)
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7]])
    runs = [
        mtp.generate(
            ids,
            policy=policy,
            max_new_tokens=12,
            attention_mask=mask,
            temperature=1.3,
            top_p=0.9,
            seed=seed,
        ).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    greedy = mtp.generate(ids, policy=policy, max_new_tokens=12, attention_mask=mask)
    top1 = mtp.generate(
        ids,
        policy=policy,
        max_new_tokens=12,
        attention_mask=mask,
        temperature=0.7,
        top_k=1,
        seed=seed,
    )
    assert torch.equal(greedy.sequences, top1.sequences)


def test_sampling_depends_on_the_seed() -> None:
    model = cached_model("llama", init=0.5)
    mtp = MTPModel(model, mask_token_id=3)
    ids = torch.tensor([[1, 2, 3]])
    samples = {
        tuple(
            mtp.generate(ids, policy=StaticK(2), max_new_tokens=16, temperature=1.0, seed=s)
            .sequences[0]
            .tolist()
        )
        for s in range(4)
    }
    assert len(samples) > 1


# --- outputs and statistics --------------------------------------------------------------------------


def test_statistics_and_callback() -> None:
    model = cached_model("llama", init=1.0)
    mtp = MTPModel(model, mask_token_id=50)
    chunks: dict[int, list[int]] = {0: [], 1: []}
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]])
    out = mtp.generate(
        ids,
        policy=ConfAdapt(0.5, 6),
        max_new_tokens=30,
        attention_mask=mask,
        on_chunk=lambda row, tokens: chunks[row].extend(tokens.tolist()),
    )
    assert out.sequences.shape == (2, 4 + 30)
    assert out.num_new_tokens.tolist() == [30, 30]
    for row in range(2):
        assert chunks[row] == out.sequences[row, 4:].tolist()
    steps = int(out.accepted_histogram.sum())
    assert steps >= out.num_forward_passes  # one row-step per active row per pass
    assert out.tokens_per_forward == pytest.approx(30 / out.num_forward_passes, rel=0.5)
    assert out.tokens_per_forward >= 1.0
    assert out.elapsed_s > 0
    # The prompt's pass is timed apart (the first of several passes), with or without on_chunk.
    assert 0 < out.first_pass_s < out.elapsed_s
    plain = mtp.generate(ids, policy=ConfAdapt(0.5, 6), max_new_tokens=30, attention_mask=mask)
    assert 0 < plain.first_pass_s < plain.elapsed_s


def test_default_policy_and_training_mode_restored() -> None:
    model = tiny_model("llama")
    model.config.mtp_k_max = 5
    model.config.mtp_threshold = 0.75
    mtp = MTPModel(model, mask_token_id=9)
    assert mtp.default_policy == ConfAdapt(threshold=0.75, k_max=5)
    model.train()
    mtp.generate(torch.tensor([[1, 2]]), max_new_tokens=3)
    assert model.training
    assert MTPModel(tiny_model("gpt2"), mask_token_id=9).default_policy == ConfAdapt()


def test_eos_list_and_generation_config_eos() -> None:
    """eos_token_id=None falls back to generation_config (an int or a list), like transformers."""
    model = tiny_model("llama", init=1.0)
    ids = torch.tensor([[1, 2, 3]])
    free = MTPModel(model, mask_token_id=3).generate(ids, policy=StaticK(1), max_new_tokens=12)
    stop = int(free.sequences[0, 6])
    model.generation_config.eos_token_id = [VOCAB - 1, stop]
    out = MTPModel(model, mask_token_id=3).generate(
        ids, policy=StaticK(3), max_new_tokens=12, verify=True
    )
    reference = greedy_reference(model, ids, torch.ones_like(ids), 12, None)
    assert torch.equal(out.sequences, reference)
    assert out.sequences[0, -1] == stop


# --- bad input -----------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors() -> None:
    model = tiny_model("llama")
    mtp = MTPModel(model, mask_token_id=3)
    with pytest.raises(ValueError, match="empty"):
        mtp.generate(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        mtp.generate(
            torch.tensor([[1, 2], [3, 4]]),
            attention_mask=torch.tensor([[1, 1], [0, 0]]),
            max_new_tokens=4,
        )
    with pytest.raises(ValueError, match="context window"):
        mtp.generate(torch.tensor([[1] * 100]), max_new_tokens=CONTEXT)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        MTPModel(model, mask_token_id=VOCAB + 5)
    with pytest.raises(ValueError, match="verify"):
        mtp.generate(torch.tensor([[1, 2]]), max_new_tokens=4, verify=True, temperature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        mtp.generate(torch.tensor([[1, 2]]), max_new_tokens=4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        mtp.generate(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="LongTensor"):
        mtp.generate([[1, 2]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="policy"):
        mtp.generate(torch.tensor([[1, 2]]), policy="static:2", max_new_tokens=4)  # type: ignore[arg-type]


def test_unsupported_models_are_rejected() -> None:
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(ValueError, match="encoder-decoder"):
        TorchBackend(t5)
    model = tiny_model("llama")
    model.config.is_causal = False
    try:
        with pytest.raises(ValueError, match="causal"):
            TorchBackend(model)
    finally:
        model.config.is_causal = True


def test_sliding_window_limits_the_context() -> None:
    """Sliding-window models decode exactly within their window and refuse to go beyond it."""
    torch.manual_seed(0)
    config = MistralConfig(**_COMMON, **_DECODER, sliding_window=24, initializer_range=1.0)
    model = MistralForCausalLM(config).to(torch.float64).eval()
    model.generation_config.pad_token_id = PAD
    mtp = MTPModel(model, mask_token_id=3)
    assert mtp.backend.max_length == 24
    ids = torch.tensor([[4, 5, 6, 7]])
    out = mtp.generate(ids, policy=StaticK(1), max_new_tokens=16, eos_token_id=[])
    reference = greedy_reference(model, ids, torch.ones_like(ids), 16, None)
    assert torch.equal(out.sequences, reference)
    with pytest.raises(ValueError, match="context window"):
        mtp.generate(ids, max_new_tokens=30)
    # Holes can make the cache hold more slots than positions: the backend refuses to step
    # beyond the window rather than silently attend differently from generate().
    backend = mtp.backend
    cache = backend.new_cache(1)
    width = 25
    step = StepInputs(
        token_ids=np.full((1, width), 4),
        position_ids=np.arange(width)[None, :],
        attention_mask=np.ones((1, width), dtype=bool),
        read_index=np.array([[width - 1]]),
    )
    with pytest.raises(ValueError, match="sliding window"):
        backend.forward(cache, step, CoreSampling(), 0)


def test_sliding_window_is_read_from_older_transformers_layer_kwargs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Older transformers 5.x (5.17 among them) return one kwargs dict for all layers from
    ``get_layer_types_and_kwargs``, newer ones a list per layer: the window is read from both."""
    import mtp_torch.decoding.backend as backend_module

    config = MistralConfig(**_COMMON, **_DECODER, sliding_window=24)
    layer_types = ["sliding_attention"] * config.num_hidden_layers
    monkeypatch.setattr(
        backend_module,
        "get_layer_types_and_kwargs",
        lambda text_config: (layer_types, {"sliding_window": 24}),
    )
    assert backend_module._sliding_window(config) == 24
    monkeypatch.setattr(
        backend_module,
        "get_layer_types_and_kwargs",
        lambda text_config: (
            layer_types,
            [{"sliding_window": 40 - i} for i in range(len(layer_types))],
        ),
    )
    assert backend_module._sliding_window(config) == 41 - len(layer_types)


def test_seeded_sampling_is_reproducible_across_threads() -> None:
    """Concurrent seeded calls do not reseed each other (no generator shared by the backend)."""
    from concurrent.futures import ThreadPoolExecutor

    model = cached_model("llama", init=0.5)
    mtp = MTPModel(model, mask_token_id=3)
    ids = torch.tensor([[1, 2, 3]])

    def sample(seed: int) -> tuple[int, ...]:
        out = mtp.generate(ids, policy=StaticK(2), max_new_tokens=24, temperature=1.0, seed=seed)
        return tuple(out.sequences[0].tolist())

    seeds = [s % 5 for s in range(30)]
    alone = {seed: sample(seed) for seed in set(seeds)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = list(pool.map(sample, seeds))
    assert together == [alone[seed] for seed in seeds]
