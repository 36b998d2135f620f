"""Online self-distillation: turn a causal LM into a multi-token predictor.

``distill`` orchestrates a run: it checks the model and corpus, builds the training state
(``mtp_torch.training.step.init_train_state``), resumes from a checkpoint, then calls
``train_step`` once per optimizer step on batches drawn by ``draw_batch``, logging, saving
checkpoints and watching the time budget, and returns the student as an ``MTPModel``.  What one
step does is described in ``mtp_torch.training.step`` (Kirchenbauer et al., "Multi-Token
Prediction via Self-Distillation", arXiv 2602.06019; docs/method.md sections 2-4).

The same loop runs under ``torchrun`` (gloo on CPU, NCCL on CUDA): every rank draws the same
``k``, offset and global batch, and trains on its slice of it, with a whole copy of the model
each (DistributedDataParallel) or, with ``DistillConfig.fsdp``, a shard of it (FSDP2,
``mtp_torch.training.fsdp``; checkpoints are then sharded too).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mtp_torch.decoding.model import MTPModel
from mtp_torch.training.batch import draw_batch
from mtp_torch.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from mtp_torch.training.config import DistillConfig as DistillConfig
from mtp_torch.training.config import check_resumable
from mtp_torch.training.config import cpu_bf16_is_fast as cpu_bf16_is_fast
from mtp_torch.training.config import cpu_preset as cpu_preset
from mtp_torch.training.data import Example, TokenStream
from mtp_torch.training.distributed import (
    barrier,
    init_distributed,
    rank_zero_decides,
    rank_zero_value,
    resolve_device,
    wrap_ddp,
)
from mtp_torch.training.lora import merge_lora
from mtp_torch.training.model_options import FLEX_ATTENTION, restore_model
from mtp_torch.training.parameters import find_blocks as find_blocks
from mtp_torch.training.step import StepMetrics as StepMetrics
from mtp_torch.training.step import StepStats, TrainState, init_train_state, train_step
from mtp_torch.weights.delta import gated_delta, load_gated_delta_into

# The model card's loss and agreement are averaged over this many last steps.
_SUMMARY_STEPS = 50

# DistillConfig, StepMetrics, cpu_bf16_is_fast, cpu_preset and find_blocks live in config,
# step and parameters; they stay importable from here, where they used to be defined.
__all__ = [
    "DistillConfig",
    "StepMetrics",
    "cpu_bf16_is_fast",
    "cpu_preset",
    "distill",
    "find_blocks",
    "training_summary",
]


def _check_causal_lm(model: Any) -> None:
    """Raise unless ``model`` is a decoder-only LM whose outputs never depend on later tokens."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "distill needs a decoder-only causal LM (AutoModelForCausalLM), got "
            f"{type(model).__name__}"
        )
    vocab = int(model.get_input_embeddings().weight.shape[0])
    probe = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.long) % vocab
    changed = probe.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            first = model(input_ids=probe.to(device)).logits
            second = model(input_ids=changed.to(device)).logits
    except (AttributeError, TypeError) as error:
        raise ValueError(
            f"distill needs a causal LM that returns logits (AutoModelForCausalLM), got "
            f"{type(model).__name__}: {error}"
        ) from error
    finally:
        model.train(was_training)
    if not torch.allclose(first[:, :-1], second[:, :-1], rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{type(model).__name__} is not causal: changing the last token changed the logits of "
            "earlier positions; multi-token prediction needs a decoder-only causal LM "
            "(AutoModelForCausalLM)"
        )


def _token_stream(
    model: Any, sequences: Iterable[Sequence[int] | Example], cfg: DistillConfig
) -> TokenStream:
    """The corpus as one stream, checked against the model's vocabulary and the window size."""
    stream = TokenStream.from_sequences(sequences, seed=cfg.seed)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if int(stream.tokens.max()) >= vocab:
        raise ValueError(
            f"the corpus holds token id {int(stream.tokens.max())} but the model's vocabulary has "
            f"{vocab} ids; tokenize the corpus with this model's tokenizer"
        )
    if len(stream) < cfg.max_window_len:
        raise ValueError(
            f"the corpus holds {len(stream)} tokens but one training window needs "
            f"{cfg.max_window_len} (seq_len={cfg.seq_len}, {cfg.regions} regions); pass more or "
            "longer sequences, or a smaller seq_len"
        )
    return stream


def _start_from_delta(state: TrainState) -> None:
    """Fill the student's gate from ``cfg.init_delta`` (before any checkpoint is resumed)."""
    cfg = state.config
    if cfg.init_delta is None:
        return
    if state.sharded:
        raise ValueError("init_delta is not supported with fsdp: start unsharded")
    load_gated_delta_into(state.student, cfg.init_delta, state.mask_token_id)


def _resume(state: TrainState, stream: TokenStream, rank: int, world_size: int) -> TrainState:
    """The state (and stream position) of the latest checkpoint, when ``cfg.resume`` asks."""
    cfg = state.config
    if not cfg.resume or cfg.out_dir is None:
        return state
    found = latest_checkpoint(cfg.out_dir)
    if found is None:
        return state
    saved_state = read_checkpoint_state(found)
    check_resumable(saved_state["config"], cfg)
    stream.load_state_dict(saved_state["data"])  # another corpus is refused before any load
    if state.sharded:
        saved = load_sharded_checkpoint(
            found,
            model=state.student,
            optimizer=state.optimizer,
            generator=state.generator,
            rank=rank,
            world_size=world_size,
        )
    else:
        saved = load_checkpoint(
            found, model=state.student, optimizer=state.optimizer, generator=state.generator
        )
    stream.load_state_dict(saved["data"])
    return attrs.evolve(state, step=int(saved["step"]))


def _drop_logged_steps_after(path: Path, step: int) -> None:
    """Forget metrics of steps after ``step`` (rolled back by a resume), rewriting atomically."""
    if not path.is_file():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
        if logged <= step:
            kept.append(line)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(temporary, path)


class _Reporter:
    """Where each step's metrics go: the JSON-lines log (rank 0), ``on_step``, a progress bar."""

    def __init__(
        self,
        cfg: DistillConfig,
        rank: int,
        step: int,
        on_step: Callable[[StepMetrics], None] | None,
    ) -> None:
        self._log_every = cfg.log_every
        self._on_step = on_step
        self.recent: collections.deque[StepMetrics] = collections.deque(maxlen=_SUMMARY_STEPS)
        self._log = None
        if cfg.log_path is not None and rank == 0:
            path = Path(cfg.log_path)
            _drop_logged_steps_after(path, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "a", encoding="utf-8")
        # Under a wall-clock budget the step count is only a cap: show steps without a made-up ETA.
        self._bar = tqdm(
            total=None if cfg.minutes is not None else cfg.steps,
            initial=step,
            disable=not cfg.progress or rank != 0,
            desc="distill",
        )

    def __enter__(self) -> _Reporter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._bar.close()
        if self._log is not None:
            self._log.close()

    def __call__(self, metrics: StepMetrics) -> None:
        self.recent.append(metrics)
        if self._log is not None and metrics.step % self._log_every == 0:
            self._log.write(json.dumps(attrs.asdict(metrics)) + "\n")
            self._log.flush()
        if self._on_step is not None:
            self._on_step(metrics)
        self._bar.update(1)
        self._bar.set_postfix(
            loss=f"{metrics.loss:.3f}",
            agree=f"{np.mean(metrics.agreement):.2f}",
            k=metrics.ks[-1],
        )


def _metrics(
    step: int, stats: StepStats, epoch: int, step_started: float, run_started: float
) -> StepMetrics:
    """``train_step``'s stats with the step number, the epoch and the timings."""
    now = time.perf_counter()
    return StepMetrics(
        step=step,
        loss=stats.loss,
        ks=stats.ks,
        agreement=stats.agreement,
        lr=stats.lr,
        grad_norm=stats.grad_norm,
        supervised_tokens=stats.supervised_tokens,
        tokens_per_s=stats.supervised_tokens / max(now - step_started, 1e-9),
        elapsed_s=now - run_started,
        epoch=epoch,
        accepted_at_0_9=stats.accepted_at_0_9,
    )


def _checkpoint_due(cfg: DistillConfig, step: int) -> bool:
    """Whether step ``step`` (not the last) ends with a periodic checkpoint."""
    return (
        cfg.out_dir is not None
        and cfg.checkpoint_every is not None
        and step % cfg.checkpoint_every == 0
        and step < cfg.steps
    )


def _save(
    state: TrainState, stream: TokenStream, rank: int, world_size: int, device: torch.device
) -> None:
    """Rank 0 writes a checkpoint of ``state`` (every rank its shards, under FSDP); every rank
    waits for it."""
    cfg = state.config
    if state.sharded and cfg.out_dir is not None:
        save_sharded_checkpoint(
            cfg.out_dir,
            step=state.step,
            model=state.student,
            optimizer=state.optimizer,
            generator=state.generator,
            data_state=stream.state_dict(),
            config=cfg.to_json(),
            rank=rank,
            world_size=world_size,
            device=device,
        )
    elif rank == 0 and cfg.out_dir is not None:
        save_checkpoint(
            cfg.out_dir,
            step=state.step,
            model=state.student,
            optimizer=state.optimizer,
            generator=state.generator,
            data_state=stream.state_dict(),
            config=cfg.to_json(),
        )
    barrier(world_size)


def training_summary(recent: Sequence[StepMetrics], cfg: DistillConfig) -> dict[str, Any]:
    """What the model card says of the run: steps, loss kind, and the loss and per-offset
    agreement averaged over the last logged steps (``recent``; one step's figures are noisy).

    Args:
      recent: the metrics of the last steps, oldest first (empty: nothing trained this call).
      cfg: the run's config.

    Returns:
      ``{"steps", "loss_kind", "k_max", "lora_rank", "loss", "agreement"}``; ``agreement[j]`` is
      the rate at offset ``j + 1`` (the next token first) over the steps whose block reached it.
    """
    summary: dict[str, Any] = {
        "steps": recent[-1].step if recent else 0,
        "loss_kind": cfg.loss,
        "k_max": cfg.k_max,
        "lora_rank": cfg.lora_rank,
    }
    if recent:
        summary["averaged_over_last_steps"] = len(recent)
        summary["loss"] = round(float(np.mean([m.loss for m in recent])), 4)
        width = max(len(m.agreement) for m in recent)
        summary["agreement"] = [
            round(float(np.mean([m.agreement[j] for m in recent if len(m.agreement) > j])), 4)
            for j in range(width)
        ]
    return summary


def _as_mtp_model(
    student: nn.Module, mask_token_id: int, cfg: DistillConfig, tokenizer: Any
) -> MTPModel:
    """The trained student as an ``MTPModel`` in eval mode (LoRA adapters merged, as a delta)."""
    delta = None
    if cfg.lora_gate is not None:
        delta = gated_delta(student, mask_token_id)
    elif cfg.lora_rank > 0:
        student, delta = merge_lora(student, mask_token_id)
    restore_model(student)
    student.eval()
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    mtp = MTPModel(student, mask_token_id=mask_token_id, tokenizer=tokenizer)
    mtp.delta = delta
    return mtp


@attrs.frozen
class _Run:
    """Where a run's loop runs: this process's rank, the number of processes, the device,
    and whether the batches need FlexAttention block masks."""

    rank: int
    world_size: int
    device: torch.device
    flex_attention: bool


def _uses_flex(model: Any) -> bool:
    """Whether ``model`` (prepared by ``init_train_state``) attends with FlexAttention."""
    return getattr(model.config, "_attn_implementation", None) == FLEX_ATTENTION


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (the previous handler comes back after).

    SIGTERM is what a batch scheduler (SLURM before its time limit), ``docker stop``, Kubernetes
    and ``timeout`` send: the loop finishes the step it is in and the run ends as if its time
    were up (final checkpoint, then the caller's model and delta), instead of losing the steps
    since the last checkpoint.  Repeats are ignored: senders often signal the process and then
    its whole group (GNU ``timeout`` does), so a second SIGTERM is no request to hurry; their
    escalation is SIGKILL after a grace period, and Ctrl-C (SIGINT) still stops at once.  Off
    the main thread, where Python allows no handler, the event is never set.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if not stop.is_set():
            stop.set()
            print("SIGTERM: stopping after this step, then saving", flush=True)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(state: TrainState, stream: TokenStream, run: _Run, report: _Reporter) -> TrainState:
    """Steps 3-4 of ``distill``: optimizer steps until ``steps`` or ``minutes`` run out or
    SIGTERM arrives (``_stop_on_sigterm``), then the final checkpoint.

    Returns:
      The state after the last step.
    """
    with _stop_on_sigterm() as stop:
        return _train_until_stopped(state, stream, run, report, stop)


def _train_until_stopped(
    state: TrainState, stream: TokenStream, run: _Run, report: _Reporter, stop: threading.Event
) -> TrainState:
    cfg = state.config
    run_started = time.perf_counter()
    while state.step < cfg.steps:
        # 3. One optimizer step on the next batch.
        step_started = time.perf_counter()
        batch = draw_batch(
            state.generator,
            stream,
            cfg,
            mask_token_id=state.mask_token_id,
            device=run.device,
            rank=run.rank,
            world_size=run.world_size,
            flex_attention=run.flex_attention,
        )
        state, stats = train_step(state, batch, lr_scale=_time_decay(cfg, run_started, run))
        # 4. Log; checkpoint; stop (on every rank alike) when the time is up.
        report(_metrics(state.step, stats, stream.epoch, step_started, run_started))
        if _checkpoint_due(cfg, state.step):
            _save(state, stream, run.rank, run.world_size, run.device)
        # Every rank asks rank 0 (one scalar broadcast per step), so all stop at the same step.
        time_is_up = stop.is_set() or (
            cfg.minutes is not None and time.perf_counter() - run_started >= cfg.minutes * 60.0
        )
        if rank_zero_decides(time_is_up, run.world_size, run.device):
            break
    if cfg.out_dir is not None:
        _save(state, stream, run.rank, run.world_size, run.device)
    return state


def _time_decay(cfg: DistillConfig, run_started: float, run: _Run) -> float:
    """The factor of ``lr_decay_minutes`` on this step's rate: 1 until the last that many
    minutes of the budget, then falling linearly to 0 at its end (rank 0's clock)."""
    if not cfg.lr_decay_minutes or cfg.minutes is None:
        return 1.0
    left = cfg.minutes * 60.0 - (time.perf_counter() - run_started)
    scale = min(1.0, max(left, 0.0) / (cfg.lr_decay_minutes * 60.0))
    return rank_zero_value(scale, run.world_size, run.device)


def distill(
    model: Any,
    sequences: Iterable[Sequence[int] | Example],
    cfg: DistillConfig | None = None,
    tokenizer: Any = None,
    *,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> MTPModel:
    """Fine-tune ``model`` in place into a multi-token predictor by online self-distillation.

    The teacher is a frozen deep copy of ``model`` as passed; the student is ``model`` itself,
    given the ``<mtp_mask>`` token (``mtp_torch.add_mask_token``) and trained with the packed
    layout and student forcing described in ``mtp_torch.training.step``.  To resume a run, pass
    the same original model, corpus and config with ``resume=True``: the teacher is rebuilt from
    the model, the student's weights, the optimizer, the RNG states and the data position come
    from the checkpoint, and the result equals that of an uninterrupted run.

    Args:
      model: a transformers decoder-only causal LM (with ``attn_implementation`` "sdpa" or
        "eager").  Trained in place (cast to ``cfg.dtype`` when set; switched to
        "flex_attention" for training when ``cfg.attention`` picks it, and back to "sdpa").
      sequences: the corpus, lists of token ids (see ``load_corpus`` / ``write_corpus``);
        concatenated into one stream that must hold at least one training window.
      cfg: the run's settings; ``None``: ``DistillConfig()``.
      tokenizer: the model's tokenizer (gets the mask token; kept on the returned model).
      on_step: called with each step's metrics (on every process).

    Returns:
      The trained student wrapped as an ``MTPModel`` (in eval mode), mask token id set.  With
      ``cfg.fsdp`` under several processes it is gathered whole on every process, on the CPU.

    Raises:
      ValueError: for a model that is not a causal LM, an empty or too short corpus, a
        ``k_max`` that does not fit a region, or a checkpoint written with other settings.
    """
    cfg = DistillConfig() if cfg is None else cfg
    # 1. Processes and device; the model and corpus checked; teacher, student and optimizer
    #    (sharded under FSDP).
    rank, world_size, local_rank = init_distributed()
    if cfg.batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the number of processes "
            f"({world_size}); it is the global batch"
        )
    device = resolve_device(cfg.device, local_rank, world_size)
    _check_causal_lm(model)
    stream = _token_stream(model, sequences, cfg)
    state = init_train_state(model, tokenizer, cfg, device, world_size=world_size)
    # 2. Start the adapters from a delta, or resume from the latest checkpoint (weights,
    #    optimizer, RNGs, data position); then DDP (unless sharded).
    _start_from_delta(state)
    state = _resume(state, stream, rank, world_size)
    if not state.sharded:
        state = attrs.evolve(state, forward=wrap_ddp(state.student, device, world_size))
    run = _Run(rank, world_size, device, _uses_flex(model))
    with _Reporter(cfg, rank, state.step, on_step) as report:
        try:
            state = _train(state, stream, run, report)
        finally:
            for hook in state.hooks:
                hook.remove()
    # 5. The student, whole (gathered from its shards under FSDP), as an MTPModel with the
    #    summary its model card shows; the teacher is let go first.
    student, mask_token_id = state.student, state.mask_token_id
    if state.sharded:
        # Lazy: FSDP runs only; the module loads torch.distributed.fsdp.
        from mtp_torch.training.fsdp import gather_full_model

        student = gather_full_model(student, lora=cfg.lora_rank > 0 and cfg.lora_gate is None)
    del state
    mtp = _as_mtp_model(student, mask_token_id, cfg, tokenizer)
    mtp.training_summary = training_summary(list(report.recent), cfg)
    return mtp
