"""Settings of a self-distillation run: ``DistillConfig`` and its presets.

This module is the one home of every training default: ``DistillConfig``'s field defaults (the
paper's, Kirchenbauer et al., arXiv 2602.06019) and ``cpu_preset`` (what ``mtp convert`` runs).
The command line builds its options from these fields (``mtp_torch.cli.options``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch

from mtp_core import LOSS_KINDS, LossKind, TrainingLayoutSpec, default_num_regions

__all__ = [
    "ATTENTION_CHOICES",
    "LORA_GATES",
    "RESUMABLE_FIELDS",
    "WEIGHT_DTYPES",
    "AttentionChoice",
    "DistillConfig",
    "LoraGate",
    "WeightDtype",
    "check_resumable",
    "cpu_bf16_is_fast",
    "cpu_preset",
]

# Config fields that may change between a run and its resumption (they do not change the
# trajectory of the weights, only when and where it stops, saves and logs).
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "minutes",
        "lr_decay_steps",
        "lr_decay_minutes",
        "out_dir",
        "resume",
        "checkpoint_every",
        "log_path",
        "log_every",
        "device",
        # Where the adapters started; a resumed run starts from its checkpoint instead.
        "init_delta",
        "progress",
        # How the same computation is carried out (recomputed activations, attention kernel).
        "gradient_checkpointing",
        "attention",
        "split_passes",
    }
)

# Weight dtypes a run may cast the model to (``DistillConfig.dtype``).
WEIGHT_DTYPES = ("bfloat16", "float32")
# Attention implementations of the training forward passes (``DistillConfig.attention``).
ATTENTION_CHOICES = ("auto", "sdpa", "flex")
WeightDtype = Literal["bfloat16", "float32"]
AttentionChoice = Literal["auto", "sdpa", "flex"]
# Gates of LoRA adapters (``DistillConfig.lora_gate``).
LORA_GATES = ("mask",)
LoraGate = Literal["mask"]


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{attribute.name} must be an integer >= 1, got {value!r}")


def _optional_positive_int(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


def _optional_non_negative_int(
    instance: object, attribute: attrs.Attribute[Any], value: Any
) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0
    ):
        raise ValueError(f"{attribute.name} must be None or an integer >= 0, got {value!r}")


def _non_negative_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{attribute.name} must be an integer >= 0, got {value!r}")


def _non_negative_float(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _positive_float(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


def _to_betas(value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {value!r}")
    return (float(value[0]), float(value[1]))


@attrs.frozen
class DistillConfig:
    """Settings of one self-distillation run (defaults: the paper's, except length and warm-up).

    Attributes:
      k_max: largest block size; each step draws ``k ~ U[k_min, k_max]`` (paper: 16).
      k_min: smallest block size drawn, ``2 <= k_min <= k_max`` (paper: 2).  A block of ``k``
        trains mask offsets ``1 .. k - 1`` and a mask never sees a later one, so ``k_min =
        k_max`` trains every offset at every region (more mask slots a step) where the
        paper's draw trains offset ``j`` at a fraction of them.
      loss: ``"hard"`` (CE against the teacher's argmax, the paper's default), ``"soft"``
        (forward KL to the teacher) or ``"gt"`` (CE against the ground-truth tokens; no teacher
        pass, so faster, and equivalent to "hard" on a corpus the teacher wrote greedily).
      steps: optimizer steps (the run also stops when ``minutes`` have passed).
      minutes: wall-clock budget in minutes, or ``None`` for none.
      lr: peak learning rate of AdamW (paper: 1e-5 at batch 128).
      mask_lr_multiplier: the mask token's embedding row moves this many times further per step
        than the other weights (its Adam update is scaled), since it starts from scratch.
      warmup_steps: linear warm-up from 0 to ``lr`` over this many steps, then constant (or
        decaying: ``lr_decay_steps``).
      lr_decay_steps: the last this many of ``steps`` decay the learning rate linearly towards
        0 (a warm-up/stable/decay schedule: the stable phase can run as long as it pays and a
        decay branch anneals it; resumable, so a constant-rate run's checkpoint can be
        continued with a decay).  0 (default): no decay.  Counts back from ``steps``, so a
        run meant to decay gives ``steps``, not only ``minutes``.
      lr_decay_minutes: the same decay for a time budget: over the last this many of
        ``minutes`` (wall clock, from this process's start of training; rank 0's clock under
        torchrun) the rate falls linearly towards 0.  0 (default): none.  Needs ``minutes``;
        one of ``lr_decay_steps`` and ``lr_decay_minutes``.
      weight_decay: AdamW weight decay (paper: 0.1).
      betas: AdamW betas (paper: 0.9, 0.95).
      clip: gradient-norm clipping threshold, or ``None`` for none (paper: 1.0).
      batch_size: packed sequences per micro-step, over all processes together.
      grad_accum: micro-steps per optimizer step.
      seq_len: ``S``, packed slots per sequence (paper: 160).
      num_regions: ``M``, regions per sequence; ``None``: ``max(1, S // (2 k_max))`` (paper).
      prefix_loss_weight: weight of the *anchor*, an extra next-token loss at every real
        (prefix) slot, of kind ``anchor_kind`` (cf. the paper's "Prefix Loss" ablation; 0
        disables it).  It anchors the student's ordinary next-token predictions, and it is
        added to ``loss`` whatever ``loss`` is.
      prefix_loss_kind: the anchor's kind: ``"soft"`` (the KL divergence to the teacher's
        logits there, which see exactly the student's tokens: 0 until the student drifts),
        ``"hard"`` (cross-entropy against the teacher's argmax) or ``"gt"`` (cross-entropy
        against the ground truth; no teacher pass).  ``None`` (the default): the kind that
        follows ``loss``, ``"gt"`` for ``loss="gt"`` and ``"soft"`` for the others
        (``anchor_kind``).  A teacher kind with ``loss="gt"`` runs the teacher for the anchor.
      entropy_weight: weight of a student entropy penalty (0 disables it).
      train_layers: train only the top ``N`` transformer blocks, the final norm and the mask
        token's embedding rows; ``0`` trains the mask token's rows alone (the real tokens'
        predictions then stay exactly the teacher's); ``None`` trains every weight (paper).
      train_mask_embedding: train the embedding matrices (with ``train_layers``: only the mask
        token's rows).  ``False`` keeps them at their initialisation, so that with
        ``train_layers`` the backward pass stops at the lowest trained block (much cheaper).
      row_windows: start every training window at a corpus row's first token (see
        ``TokenStream.take_weighted``): targets then see the full context they were written
        with, which a teacher-written corpus needs for its tokens to be the teacher's argmax;
        ``False`` cuts windows from the concatenated stream (the paper's packing).
      confident_targets: focus the mask offsets on what ConfAdapt can accept: offset ``j`` of a
        region keeps its full weight only where the teacher wrote the targets of offsets
        ``0 .. j`` each with top-1 probability ``>= confident_targets`` (a corpus from
        ``write_corpus`` records them); elsewhere it gets ``unconfident_weight``.  Offset 0
        (the ordinary next token) always keeps its weight.  ``None``: every target alike.
      unconfident_weight: weight of the mask targets outside a confident run (see above); above
        0 so the student still learns to be unsure there.
      lora_rank: ``> 0``: train LoRA adapters of this rank (``peft``) on every linear layer of
        the trained blocks (all blocks, or the top ``train_layers``) instead of their weights;
        the teacher is then the same model with its adapters disabled (no second copy), and
        the adapters are merged into plain weights when training ends.  ``0``: full
        fine-tuning (the paper).
      lora_alpha: LoRA scaling numerator (the update is ``alpha / rank * B A``); ``None``:
        ``lora_rank`` (a scale of 1).
      lora_gate: ``"mask"``: mask-gated adapters (Samragh et al. 2025, arXiv 2507.11851;
        ``mtp_torch.decoding.gated``): the ``lora_rank`` adapters act only on rows whose input
        is the mask token, and the mask token's input embedding is a vector of the gate (trained
        when ``train_mask_embedding``), so every real token's logits stay bitwise the base
        model's.  The teacher is the model itself (no copy, no adapters to disable), the
        adapters are not merged (the result keeps its gate), and ``prefix_loss_weight`` must
        be 0 (real tokens cannot move).  ``None``: plain LoRA, merged when training ends.
      init_delta: a gated delta file (``save_delta`` of a ``lora_gate="mask"`` run, e.g. the
        shipped default's ``default_delta_path()``) whose adapters and mask vector the student
        starts from instead of LoRA's zero update: a conversion continues from where an earlier
        one stopped when only its delta is left (its optimizer state starts afresh; warm-up
        applies again).  Needs ``lora_gate="mask"`` with the delta's rank and adapted layers.
        Ignored when ``resume`` finds a checkpoint (the checkpoint holds later weights).
      seed: seeds the block sizes, offsets, data order, mask init and dropout.
      out_dir: checkpoint directory, or ``None`` for no checkpoints.
      checkpoint_every: save every this many steps (a final checkpoint is always written when
        ``out_dir`` is set); ``None``: only at the end.
      resume: continue from the latest checkpoint in ``out_dir`` when there is one.
      log_path: JSON-lines metrics file (one object per step), or ``None``.
      log_every: write metrics every this many steps.
      device: torch device; ``None``: CUDA when available (this process's local rank under
        torchrun), else CPU.
      bf16: run forward passes under bfloat16 autocast (weights and optimizer stay in their
        dtype, float32 unless ``dtype`` says otherwise).  ``None``: on CUDA only.  ``True`` also
        on the CPU, where processors with AVX-512 BF16 or AMX run bfloat16 matrix products
        2-3x faster than float32.  With ``fsdp`` on CUDA it also sets FSDP's mixed precision
        (parameters all-gathered in bfloat16, gradients reduced in float32).
      dtype: cast the weights of student and teacher to this dtype (``"bfloat16"`` or
        ``"float32"``) before training; ``None`` keeps the dtype the model was loaded in.
        LoRA adapters stay float32 (``peft``'s default).  Pure bfloat16 full fine-tuning keeps
        AdamW's moments in bfloat16 too and rounds away updates smaller than ~1/256 of a
        weight (docs/guides/large_models.md).
      fsdp: under ``torchrun`` with several processes, shard the student (and a frozen
        teacher) with PyTorch's ``fully_shard`` (FSDP2) over all processes: each block, then
        the whole model; checkpoints are sharded (``torch.distributed.checkpoint``).
        ``False``: DistributedDataParallel (a whole copy per process).  Alone it does
        nothing.
      gradient_checkpointing: recompute each block's activations in the backward pass
        (transformers' activation checkpointing, non-reentrant) instead of keeping them:
        less memory, about one more forward pass of time; same loss and gradients.
      split_passes: with mask-gated adapters (``lora_gate="mask"``), run each student forward
        as two passes: the real slots without autograd (no trained parameter acts on them and
        they never attend to a mask slot), then the mask slots alone with gradients, attending
        to the real slots' keys and values (``mtp_torch.training.batch.split_forward_logits``).
        The same logits and gradients to rounding, with the backward pass over the
        ``M (k - 1)`` mask slots instead of all ``seq_len``.  Applies with dense attention
        (``"auto"`` then takes SDPA, not FlexAttention), without FSDP, on models whose layers
        are all attention layers; otherwise the single packed pass runs.
      attention: how the training passes attend under the packed layout's mask: ``"sdpa"``
        (a 4-D boolean mask through ``scaled_dot_product_attention``, or the model's eager
        attention), ``"flex"`` (CUDA: a FlexAttention block mask; the model is switched to
        ``attn_implementation="flex_attention"`` for training and back to "sdpa" after), or
        ``"auto"``: flex on CUDA when the model and torch support it, else sdpa.
      progress: show a tqdm progress bar (rank 0 only).
    """

    k_max: int = attrs.field(default=16)
    k_min: int = attrs.field(default=2)
    loss: LossKind = attrs.field(default="hard")
    steps: int = attrs.field(default=1000, validator=_positive_int)
    minutes: float | None = attrs.field(default=None)
    lr: float = attrs.field(default=1e-5, validator=_positive_float)
    mask_lr_multiplier: float = attrs.field(default=1.0, validator=_positive_float)
    warmup_steps: int = attrs.field(default=0)
    lr_decay_steps: int = attrs.field(default=0)
    lr_decay_minutes: float = attrs.field(default=0.0, validator=_non_negative_float)
    weight_decay: float = attrs.field(default=0.1, validator=_non_negative_float)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), converter=_to_betas)
    clip: float | None = attrs.field(default=1.0)
    batch_size: int = attrs.field(default=8, validator=_positive_int)
    grad_accum: int = attrs.field(default=1, validator=_positive_int)
    seq_len: int = attrs.field(default=160, validator=_positive_int)
    num_regions: int | None = attrs.field(default=None, validator=_optional_positive_int)
    prefix_loss_weight: float = attrs.field(default=0.0, validator=_non_negative_float)
    prefix_loss_kind: LossKind | None = attrs.field(default=None)
    entropy_weight: float = attrs.field(default=0.0, validator=_non_negative_float)
    train_layers: int | None = attrs.field(default=None, validator=_optional_non_negative_int)
    train_mask_embedding: bool = attrs.field(default=True)
    row_windows: bool = attrs.field(default=False)
    confident_targets: float | None = attrs.field(default=None)
    unconfident_weight: float = attrs.field(default=0.1, validator=_non_negative_float)
    lora_rank: int = attrs.field(default=0, validator=_non_negative_int)
    lora_alpha: float | None = attrs.field(default=None)
    lora_gate: LoraGate | None = attrs.field(default=None)
    init_delta: str | None = attrs.field(default=None)
    seed: int = attrs.field(default=0, validator=_non_negative_int)
    out_dir: str | None = attrs.field(default=None)
    checkpoint_every: int | None = attrs.field(default=None, validator=_optional_positive_int)
    resume: bool = attrs.field(default=False)
    log_path: str | None = attrs.field(default=None)
    log_every: int = attrs.field(default=1, validator=_positive_int)
    device: str | None = attrs.field(default=None)
    bf16: bool | None = attrs.field(default=None)
    dtype: WeightDtype | None = attrs.field(default=None)
    fsdp: bool = attrs.field(default=False)
    gradient_checkpointing: bool = attrs.field(default=False)
    split_passes: bool = attrs.field(default=True)
    attention: AttentionChoice = attrs.field(default="auto")
    progress: bool = attrs.field(default=True)

    @property
    def loss_reads_teacher(self) -> bool:
        """Whether ``loss`` reads the teacher's logits: every loss but ground truth (``"gt"``)."""
        return self.loss != "gt"

    @property
    def anchor_kind(self) -> LossKind:
        """The anchor's kind (see ``prefix_loss_kind``): the one set, else ``"gt"`` for
        ``loss="gt"`` and ``"soft"`` for the losses that read the teacher."""
        if self.prefix_loss_kind is not None:
            return self.prefix_loss_kind
        return "soft" if self.loss_reads_teacher else "gt"

    @property
    def needs_teacher(self) -> bool:
        """Whether training builds and runs a teacher: for every loss but ground truth
        (``"gt"``), and for an anchor (``prefix_loss_weight > 0``) of a teacher kind."""
        anchor_reads_teacher = self.prefix_loss_weight > 0 and self.anchor_kind != "gt"
        return self.loss_reads_teacher or anchor_reads_teacher

    @device.validator
    def _check_device(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        try:
            torch.device(value)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"device must be None or a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                f"{value!r}"
            ) from error

    @k_max.validator
    def _check_k_max(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(
                f"k_max must be an integer >= 2 (k = 1 is plain next-token training), got {value!r}"
            )

    @k_min.validator
    def _check_k_min(self, attribute: attrs.Attribute[int], value: int) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or not 2 <= value <= self.k_max
        ):
            raise ValueError(
                f"k_min must be an integer in [2, k_max={self.k_max}] (the smallest block size a "
                f"step draws), got {value!r}"
            )

    @loss.validator
    def _check_loss(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {value!r}")

    @prefix_loss_kind.validator
    def _check_prefix_loss_kind(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and value not in LOSS_KINDS:
            raise ValueError(
                f"prefix_loss_kind must be None (follow loss) or one of {LOSS_KINDS}, got {value!r}"
            )

    @minutes.validator
    def _check_minutes(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    @warmup_steps.validator
    def _check_warmup(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {value!r}")

    @lr_decay_steps.validator
    def _check_lr_decay(self, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"lr_decay_steps must be an integer >= 0, got {value!r}")
        if value > self.steps:
            raise ValueError(
                f"lr_decay_steps ({value}) exceeds steps ({self.steps}): the decay counts back "
                "from the last step, so give --steps as well (or fewer decay steps)"
            )

    @lr_decay_minutes.validator
    def _check_lr_decay_minutes(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not value:
            return
        if self.lr_decay_steps:
            raise ValueError("give lr_decay_steps or lr_decay_minutes, not both")
        if self.minutes is None or value > self.minutes:
            raise ValueError(
                f"lr_decay_minutes ({value}) needs a time budget at least as long (minutes: "
                f"{self.minutes}); with a step count use lr_decay_steps"
            )

    @betas.validator
    def _check_betas(self, attribute: attrs.Attribute[Any], value: tuple[float, float]) -> None:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"betas must both lie in [0, 1), got {value}")

    @clip.validator
    def _check_clip(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    @confident_targets.validator
    def _check_confident_targets(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        ):
            raise ValueError(
                f"confident_targets must be None or a probability in (0, 1], got {value!r}"
            )

    @lora_gate.validator
    def _check_lora_gate(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if value not in LORA_GATES:
            raise ValueError(f"lora_gate must be None or one of {LORA_GATES}, got {value!r}")
        if self.lora_rank < 1:
            raise ValueError("lora_gate='mask' gates LoRA adapters: set lora_rank >= 1 (e.g. 32)")
        if self.prefix_loss_weight > 0:
            raise ValueError(
                "prefix_loss_weight must be 0 with lora_gate='mask': the real tokens' "
                "predictions are the base model's and cannot move"
            )
        if self.gradient_checkpointing:
            raise ValueError(
                "gradient_checkpointing is not supported with lora_gate='mask' (the recomputed "
                "blocks would not see which rows are mask rows); turn it off"
            )

    @init_delta.validator
    def _check_init_delta(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and self.lora_gate is None:
            raise ValueError(
                "init_delta starts mask-gated adapters from a delta: set lora_gate='mask' (and "
                "the delta's lora_rank)"
            )

    @dtype.validator
    def _check_dtype(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and value not in WEIGHT_DTYPES:
            raise ValueError(
                f"dtype must be None (as loaded) or one of {WEIGHT_DTYPES}, got {value!r}"
            )

    @attention.validator
    def _check_attention(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {value!r}")

    @lora_alpha.validator
    def _check_lora_alpha(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _positive_float(self, attribute, value)

    def __attrs_post_init__(self) -> None:
        if self.train_layers == 0 and not self.train_mask_embedding:
            raise ValueError(
                "train_layers=0 with train_mask_embedding=False leaves nothing to train; train "
                "the mask embedding or at least one block"
            )
        # The largest block must fit a region: this raises the layout's "k_max larger than the
        # region" message early, before any model work.
        TrainingLayoutSpec(seq_len=self.seq_len, k=self.k_max, num_regions=self.regions)

    @property
    def regions(self) -> int:
        """``M``: the configured region count, or the paper's density ``max(1, S // (2 k_max))``."""
        if self.num_regions is not None:
            return int(self.num_regions)
        return default_num_regions(self.seq_len, self.k_max)

    @property
    def max_window_len(self) -> int:
        """Ground-truth tokens of the longest window any step needs (the one of ``k = k_min``)."""
        return max(
            TrainingLayoutSpec(self.seq_len, k, self.regions).window_len
            for k in range(self.k_min, self.k_max + 1)
        )

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values."""
        values = attrs.asdict(self)
        values["betas"] = list(self.betas)
        return values


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_preset(**overrides: Any) -> DistillConfig:
    """The conversion ``mtp convert`` runs by default: the most learning per CPU-second we found.

    Chosen by measurement on SmolLM2-135M-Instruct (2 CPU cores; docs/results.md has the
    curves), for a corpus the teacher wrote itself (``write_corpus``):

    - the paper's hard-teacher loss plus a KL anchor (weight 2) to the teacher at every real
      slot: without the anchor the student's own next-token predictions drift (``loss="gt"``
      alone ran 3x faster per step but its output's NLL under the base model rose 28% in 12
      minutes; with the anchor it stayed within 6% at 11 minutes; ``loss="gt"`` with a
      cross-entropy anchor of weight 2 learns acceptance 3-4x faster per CPU-minute but its NLL
      rose 15% in 10 minutes and 37-55% later, so it is the choice for long runs only);
    - ``row_windows``: each window starts at a row, so every target sees the context it was
      written with (cut windows agreed with the teacher only ~70% of the time at offset 0);
    - LoRA (rank 64, scale 1, lr 1e-3) on the top 8 blocks, embeddings frozen: backward stops
      at block 22, the teacher is the same weights with the adapters off, and the result ships
      as a 10 MB delta;
    - ``confident_targets``: mask offsets train fully only inside runs of confident teacher
      tokens, the only runs ConfAdapt can accept;
    - bfloat16 autocast where the CPU has native bf16 (2.6x float32 matmuls measured).

    With ``lora_gate="mask"`` among the overrides the preset is the gated one: ``loss="gt"``
    with no anchor (real tokens cannot drift), rank-32 gated adapters on every block and the
    gate's mask vector trained (``_GATED_PRESET``); other overrides still win.

    Args:
      **overrides: any ``DistillConfig`` field, replacing the preset's value.

    Returns:
      The config.
    """
    preset: dict[str, Any] = {
        "k_max": 4,
        "steps": 1_000_000,
        "minutes": 10.0,
        "lr": 1e-3,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "batch_size": 2,
        "seq_len": 400,
        "train_layers": 8,
        "train_mask_embedding": False,
        "lora_rank": 64,
        "row_windows": True,
        "confident_targets": 0.6,
        "unconfident_weight": 0.2,
        "prefix_loss_weight": 2.0,
        "bf16": True if cpu_bf16_is_fast() else None,
        "checkpoint_every": 50,
    }
    if overrides.get("lora_gate") == "mask":
        preset.update(_GATED_PRESET)
    preset.update(overrides)
    return DistillConfig(**preset)


# What ``cpu_preset(lora_gate="mask")`` changes: the real tokens cannot drift, so no anchor and
# the teacher's own greedy corpus as targets (``gt``: no teacher pass); adapters on every block
# (mask rows compute a different function through the whole depth) with the gate's mask vector
# trained; rank 32 keeps the shipped delta of the default under 25 MB (fp16).
_GATED_PRESET: dict[str, Any] = {
    "loss": "gt",
    "prefix_loss_weight": 0.0,
    "train_layers": None,
    "train_mask_embedding": True,
    "lora_rank": 32,
}


def check_resumable(saved: dict[str, Any], cfg: DistillConfig) -> None:
    """Raise unless a checkpoint written with config ``saved`` may continue under ``cfg``.

    Args:
      saved: the checkpoint's config, as written by ``DistillConfig.to_json``.
      cfg: the settings of the run that resumes.

    Raises:
      ValueError: naming the fields outside ``RESUMABLE_FIELDS`` that differ.
    """
    current = cfg.to_json()
    # A field the checkpoint does not name is older than it: it ran with the field's default.
    default_of = {field.name: field.default for field in attrs.fields(DistillConfig)}
    differing = sorted(
        name
        for name, value in current.items()
        if name not in RESUMABLE_FIELDS and saved.get(name, default_of.get(name)) != value
    )
    if differing:
        raise ValueError(
            f"cannot resume: the checkpoint was written with other settings for {differing}; "
            "use the same settings (only steps, minutes, the decay, logging and device may change) "
            "or a new out_dir"
        )
