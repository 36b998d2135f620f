"""The lm-evaluation-harness model ``"mtp"``: evaluate an MTP model on the harness's tasks.

Importing this module registers the model name with the harness::

    import lm_eval
    import mtp_torch.integrations.lm_eval  # registers "mtp"

    results = lm_eval.simple_evaluate(
        model="mtp",
        model_args="pretrained=default,policy=confadapt:0.9",
        tasks=["gsm8k_cot"],
    )
    print(results["config"]["mtp_tokens_per_forward"])

Generation tasks (``generate_until``) decode with the model's multi-token decoding; scoring
tasks (``loglikelihood``, ``loglikelihood_rolling``: multiple choice, perplexity) read plain
forward passes of the same weights, as for any causal LM.  From the command line,
``python -m mtp_torch.integrations.lm_eval`` is the harness's own ``lm-eval`` with ``"mtp"``
registered.  See ``docs/guides/evaluating.md``.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019
(the paper reports GSM8K accuracy beside tokens per forward pass).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from mtp_core import AcceptancePolicy
from mtp_torch.decoding.kernels import check_linear_kernel
from mtp_torch.decoding.model import MTPModel
from mtp_torch.decoding.policies import parse_policy
from mtp_torch.integrations.stopping import DecodeSettings, GenerationStats, decode_until
from mtp_torch.text import render_chat_template, stop_token_ids

__all__ = ["DEFAULT_MAX_LENGTH", "MTPEvalLM", "main"]

# The harness's command line shows only its own loggers, so the tally is logged under its name.
logger = logging.getLogger("lm_eval.models.mtp")

#: Context window used when the model's config names none (the harness's own default).
DEFAULT_MAX_LENGTH = 2048

# Generation arguments of a task that the MTP decoder understands; others are ignored (logged).
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")

# One scoring row: (request strings or None, context token ids, continuation token ids).
_ScoreRequest = tuple[Any, list[int], list[int]]


@register_model("mtp")
class MTPEvalLM(TemplateLM):  # type: ignore[misc]  # the harness is untyped
    """An ``MTPModel`` as an lm-evaluation-harness language model.

    The ``model_args`` string (``"pretrained=DIR,policy=confadapt:0.9,batch_size=8"``) maps onto
    the arguments below; the harness's ``--batch_size`` and ``--device`` fill theirs.

    Args:
      pretrained: a converted checkpoint directory, a plain causal-LM directory or Hub id (a
        mask token is added), ``"default"`` or ``"default-base"`` (see
        ``MTPModel.from_pretrained``), or an ``MTPModel`` already loaded (then ``dtype`` and
        ``device`` are not used).
      policy: the decoding policy (``confadapt``, ``confadapt:0.9``, ``confadapt:0.9:8``,
        ``static:3``; see ``mtp generate --policy``) or a policy object; ``None`` uses the
        checkpoint's own.
      dtype: parameter dtype (``float32``, ``bfloat16``, ``auto`` ...); ``None`` is float32.
      device: where to run; ``None`` is ``cuda`` when available, else ``cpu``.  A CUDA device
        on a machine without CUDA falls back to ``cpu`` with a warning (the harness's command
        line asks for ``cuda:0`` unless told otherwise).
      batch_size: requests decoded (or scored) together.
      max_gen_toks: generation budget of a request whose task sets none (the harness's name).
      max_new_tokens: the same, under the ``mtp`` command line's name; overrides
        ``max_gen_toks`` when given.
      max_length: context window in tokens; ``None`` reads it from the model's config (else
        ``DEFAULT_MAX_LENGTH``).  Longer prompts lose tokens on the left, as in the harness's
        ``hf`` model.
      verify: decode in lossless mode (the output equals greedy decoding).
      add_bos_token: whether tokenizing adds special tokens (``None``: the tokenizer's default).
      chat_template_args: extra keyword arguments of ``tokenizer.apply_chat_template`` (e.g.
        ``{"enable_thinking": False}``) when the harness runs with ``apply_chat_template``.
      seed: seed of the sampling draws of tasks that sample.
      linear_kernel: ``"stock"``, ``"skinny"``, ``"native"`` or ``"auto"`` (see ``MTPModel``);
        ``None`` keeps a loaded model's, else ``"stock"`` (evaluations default to exact
        numerics).
      max_batch_size: accepted for the harness's interface and unused (no automatic batch size).

    Attributes:
      mtp: the ``MTPModel``.
      policy: the decoding policy in use.
      generation_stats: tokens per forward pass over every generation request so far.
      stats_by_task: the same, per task name.

    Raises:
      ValueError: for a bad policy, dtype, batch size or budget, or a model without tokenizer.
    """

    def __init__(
        self,
        pretrained: str | MTPModel = "default",
        policy: str | AcceptancePolicy | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_gen_toks: int = 256,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        verify: bool = False,
        add_bos_token: bool | None = None,
        chat_template_args: dict[str, Any] | None = None,
        seed: int = 0,
        linear_kernel: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        device = _available_device(device)
        if isinstance(pretrained, MTPModel):
            self.mtp = pretrained
        else:
            self.mtp = MTPModel.from_pretrained(str(pretrained), dtype=dtype, device=device)
        if linear_kernel is not None:
            self.mtp.linear_kernel = check_linear_kernel(linear_kernel)
        if self.mtp.tokenizer is None:
            raise ValueError(
                f"the model {pretrained!r} has no tokenizer; the harness gives text, so save "
                "the tokenizer with the model (MTPModel(..., tokenizer=...).save_pretrained)"
            )
        self.tokenizer = self.mtp.tokenizer
        self.policy: AcceptancePolicy = self.mtp.default_policy
        if isinstance(policy, str):
            self.policy = parse_policy(policy, self.mtp.default_policy)
        elif policy is not None:
            self.policy = policy
        self._batch_size = _positive_int("batch_size", batch_size)
        budget = max_gen_toks if max_new_tokens is None else max_new_tokens
        self._max_gen_toks = _positive_int("max_gen_toks", budget)
        window = max_length if max_length is not None else self.mtp.backend.max_length
        self._max_length = _positive_int("max_length", window or DEFAULT_MAX_LENGTH)
        self.verify = bool(verify)
        self.add_bos_token = add_bos_token
        self.chat_template_args = dict(chat_template_args or {})
        self.seed = int(seed)
        self.generation_stats = GenerationStats()
        self.stats_by_task: dict[str, GenerationStats] = {}

    # ------------------------------------------------------------------------------------------
    # What the harness reads

    @property
    def device(self) -> torch.device:
        """The device of the model's input embeddings."""
        return self.mtp.backend.device

    @property
    def max_length(self) -> int:
        """Context window in tokens (prompt plus continuation)."""
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        """Generation budget of a request whose task sets none."""
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        """Requests decoded or scored together."""
        return self._batch_size

    @property
    def eot_token_id(self) -> int:
        """The end-of-text token (the tokenizer's EOS, else the model's first stop id)."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            stops = stop_token_ids(None, self.mtp.model)
            eos = stops[0] if stops else 0
        return int(eos)

    @property
    def prefix_token_id(self) -> int:
        """The token that stands before a text scored from its start (BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, as the harness uses it in cache keys."""
        return str(getattr(self.tokenizer, "name_or_path", "") or "mtp").replace("/", "__")

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per forward pass, averaged over every generation request so far."""
        return self.generation_stats.tokens_per_forward

    @property
    def num_forward_passes(self) -> int:
        """Batched forward passes made for generation requests so far."""
        return self.generation_stats.num_forward_passes

    def get_model_info(self) -> dict[str, Any]:
        """What ``simple_evaluate`` adds to ``results["config"]``: the policy and the tally.

        Returns:
          ``mtp_policy``, ``mtp_tokens_per_forward`` (mean over generation requests),
          ``mtp_forward_passes``, ``mtp_generated_tokens``, ``mtp_generation_requests`` and
          ``mtp_stats_by_task`` (each task's ``GenerationStats.as_dict()``).
        """
        stats = self.generation_stats
        return {
            "mtp_policy": repr(self.policy),
            "mtp_verify": self.verify,
            "mtp_tokens_per_forward": stats.tokens_per_forward,
            "mtp_forward_passes": stats.num_forward_passes,
            "mtp_generated_tokens": stats.num_generated_tokens,
            "mtp_generation_requests": stats.num_requests,
            "mtp_stats_by_task": {
                task: value.as_dict() for task, value in sorted(self.stats_by_task.items())
            },
        }

    # ------------------------------------------------------------------------------------------
    # Text

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of ``string``.

        Args:
          string: the text.
          add_special_tokens: ``None`` adds them per ``add_bos_token`` (else the tokenizer's
            default), except to a string that already starts with the BOS text.
          **kwargs: ignored (the harness's interface).

        Returns:
          The token ids.
        """
        if add_special_tokens is None:
            bos_text = self.tokenizer.decode([self.prefix_token_id])
            starts_with_bos = bool(bos_text) and string.startswith(bos_text)
            add_special_tokens = False if starts_with_bos else self.add_bos_token
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return [int(token) for token in self.tokenizer.encode(string, **extra)]

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation rendered by the tokenizer's chat template (the harness's
        ``apply_chat_template=True``).

        Args:
          chat_history: ``[{"role": ..., "content": ...}, ...]``.
          add_generation_prompt: open an assistant turn; ``False`` continues the last message.

        Returns:
          The prompt text.
        """
        return render_chat_template(
            self.tokenizer,
            chat_history,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            **self.chat_template_args,
        )

    # ------------------------------------------------------------------------------------------
    # Scoring: plain forward passes

    def _loglikelihood_tokens(
        self,
        requests: Sequence[_ScoreRequest],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context, and whether it is greedy.

        Args:
          requests: ``(strings, context_ids, continuation_ids)`` per request; ``strings`` keys
            the harness's cache (``None``: not cached).
          disable_tqdm: hide the progress bar.
          **kwargs: ignored (the harness's interface).

        Returns:
          Per request, the summed log-probability (natural log) of the continuation tokens and
          whether each of them is the argmax at its position.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # 1. Longest first, so each batch pads little (and memory errors show at once).
        order = sorted(range(len(requests)), key=lambda i: -_score_length(requests[i]))
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="mtp: scoring")
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            # 2. Each row: context + continuation less its last token, cut to the window.
            rows = [_score_window(requests[i], self.max_length) for i in batch]
            # 3. One forward pass; each row's continuation read from its last positions.
            for index, answer in zip(batch, self._score_rows(rows), strict=True):
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            progress.update(len(batch))
        progress.close()
        return [answer for answer in results if answer is not None]

    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score each row's continuation (see ``_continuation_score``) in one forward pass.

        Args:
          rows: ``(input_tokens, continuation)``; the input ends just before the continuation's
            last token, so its last ``len(continuation)`` positions predict the continuation.
        """
        width = max(len(tokens) for tokens, _ in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (tokens, _) in enumerate(rows):
            input_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            attention_mask[row, : len(tokens)] = 1
        model = self.mtp.model
        was_training = bool(model.training)
        model.eval()
        try:
            with torch.no_grad():
                logits = model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                ).logits
        finally:
            model.train(was_training)
        return [
            _continuation_score(
                logits[row, len(tokens) - len(continuation) : len(tokens)], continuation
            )
            for row, (tokens, continuation) in enumerate(rows)
        ]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-probability of each whole text, in windows of the context length.

        Args:
          requests: harness instances whose ``args`` are ``(text,)``.
          disable_tqdm: hide the progress bar.

        Returns:
          Per request, the summed log-probability of every token of the text, the first one
          conditioned on ``prefix_token_id``.
        """
        windows: list[_ScoreRequest] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            token_windows = harness_utils.get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(harness_utils.make_disjoint_window, token_windows):
                windows.append((None, *window))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, scores, strict=True):
            totals[owner] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------
    # Generation: multi-token decoding

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context with MTP decoding until a stop string or the token budget.

        Requests are grouped by task and generation arguments and decoded ``batch_size`` at a
        time.  A request's ``until`` strings (and the EOS text) end its continuation, which is
        returned without them; ``max_gen_toks`` bounds it.  ``generation_stats`` and
        ``stats_by_task`` count the tokens and forward passes.

        Args:
          requests: harness instances whose ``args`` are ``(context, generation_kwargs)``.
          disable_tqdm: hide the progress bar.

        Returns:
          Per request, the generated text.
        """
        outputs: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="mtp: generating")
        for gen_kwargs, indices in _group_requests(requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            settings = self._settings(kwargs)
            prompts = {
                i: self.tok_encode(requests[i].args[0])[-self._max_prompt(settings) :]
                for i in indices
            }
            # Longest prompts first, so each batch pads little.
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                continuations, stats = decode_until(
                    self.mtp, [prompts[i] for i in batch], until, settings
                )
                for index, tokens in zip(batch, continuations, strict=True):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    outputs[index] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial(
                        "generate_until", requests[index].args, outputs[index]
                    )
                self._count(stats, _task_name(requests[batch[0]]))
                progress.update(len(batch))
        progress.close()
        if requests:
            logger.info(
                "mtp: %.3f tokens per forward pass (mean over %d requests), %d forward passes, "
                "policy %r",
                self.tokens_per_forward,
                self.generation_stats.num_requests,
                self.num_forward_passes,
                self.policy,
            )
        return outputs

    def _settings(self, kwargs: dict[str, Any]) -> DecodeSettings:
        """Decode settings from a task's normalised generation arguments."""
        budget = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks"), allow_zero=True)
        ignored = sorted(set(kwargs) - set(_SAMPLING_KEYS))
        if ignored:
            harness_utils.warning_once(
                logger, "mtp: generation arguments %s are not used by MTP decoding", ignored
            )
        sampling = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
        return DecodeSettings(
            policy=self.policy,
            max_new_tokens=budget,
            verify=self.verify,
            temperature=float(kwargs.get("temperature") or 0.0) if sampling else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sampling else 1.0,
            top_k=int(kwargs.get("top_k") or 0) if sampling else 0,
            seed=self.seed,
        )

    def _max_prompt(self, settings: DecodeSettings) -> int:
        """Prompt tokens kept (from the right) so the budget fits the context window."""
        room = self.max_length - settings.max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_gen_toks={settings.max_new_tokens} leaves no room for a prompt in the "
                f"context window of {self.max_length} tokens; lower max_gen_toks"
            )
        return room

    def _count(self, stats: GenerationStats, task: str) -> None:
        """Add a batch's tally to the totals and to its task's."""
        self.generation_stats = self.generation_stats + stats
        self.stats_by_task[task] = self.stats_by_task.get(task, GenerationStats()) + stats


def _positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
    """``value`` (an int or its digits) as an int >= 1 (>= 0 with ``allow_zero``).

    Raises:
      ValueError: naming ``name``, for anything else.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    minimum = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _available_device(device: str | None) -> str:
    """``device``, or ``cpu`` where CUDA is asked for (or ``None`` given) and there is none."""
    has_cuda = torch.cuda.is_available()
    if device is None:
        return "cuda" if has_cuda else "cpu"
    if str(device).startswith("cuda") and not has_cuda:
        logger.warning("mtp: device %r asked for but CUDA is not available; using cpu", device)
        return "cpu"
    return str(device)


def _task_name(request: Any) -> str:
    """The harness task a request belongs to (``""`` when it names none)."""
    return str(getattr(request, "task_name", None) or "")


def _group_requests(requests: Sequence[Any]) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """Request indices grouped by task and equal generation arguments, in first-seen order."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for index, request in enumerate(requests):
        gen_kwargs = dict(request.args[1])
        key = (_task_name(request), json.dumps(gen_kwargs, sort_keys=True, default=str))
        groups[key].append(index)
        first.setdefault(key, gen_kwargs)
    for key, indices in groups.items():
        yield first[key], indices


def _score_length(request: _ScoreRequest) -> int:
    return len(request[1]) + len(request[2])


def _score_window(request: _ScoreRequest, max_length: int) -> tuple[list[int], list[int]]:
    """The input row of a scoring request (cut on the left to the window) and its continuation."""
    _, context, continuation = request
    if not continuation:
        raise ValueError("a loglikelihood request has an empty continuation")
    tokens = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    return tokens, list(continuation)


def _continuation_score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``continuation``, and whether each token is the argmax.

    Args:
      logits: ``(len(continuation), vocab)`` logits of the positions that predict the
        continuation's tokens (log-softmax taken here, in float32).
      continuation: the scored token ids.

    Returns:
      ``(log_probability, is_greedy)`` (natural log).
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
    target = torch.as_tensor(continuation, dtype=torch.long)
    log_prob = float(log_probs.gather(1, target[:, None]).sum())
    return log_prob, bool((log_probs.argmax(dim=-1) == target).all())


def main() -> None:
    """The harness's ``lm-eval`` command line with the ``"mtp"`` model registered."""
    # Lazy: the harness's command-line module loads only when its command runs.
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
