"""The model card (``README.md``) that ``MTPModel.save_pretrained`` writes beside the weights.

It says what the checkpoint is (the base model, converted by the method of Kirchenbauer et al.,
"Multi-Token Prediction via Self-Distillation", arXiv 2602.06019), its MTP settings, how it was
trained when that is known, and how to load it with transformers and with mtp-lm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mtp_torch._resources import cache_root
from mtp_torch.decoding.named import DEFAULT_MODEL_NAME, HF_MODEL_ID

__all__ = ["CardFacts", "base_model_name", "check_training_summary", "model_card"]

PAPER = 'Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019'
PAPER_URL = "https://arxiv.org/abs/2602.06019"

# Keys of a training summary that the card shows in its own words, in this order; any other
# key is shown as it is.
_SUMMARY_LABELS = {
    "steps": "optimizer steps",
    "data": "training data",
    "loss_kind": "distillation loss",
    "loss": "final training loss",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@attrs.frozen
class CardFacts:
    """What the card states about one save.

    Attributes:
      name: the checkpoint directory's name (used in the loading examples).
      base_model: the model that was converted (a Hub id or a local name), or ``None``.
      architecture: the transformers class, e.g. ``"LlamaForCausalLM"``.
      mask_token_id: id of the ``<mtp_mask>`` token.
      k_max: the stored default policy's positions per step (``mtp_k_max``).
      threshold: the stored default ConfAdapt threshold, ``None`` for another policy.
      training_summary: what training reported (see ``check_training_summary``), or ``None``.
      gated: whether the model carries mask-gated adapters (``mtp_gate.safetensors``).
      policy: the stored default policy's spec (``mtp_policy``, e.g. ``"static:3"``), or
        ``None`` (a ConfAdapt of ``threshold`` and ``k_max``).
    """

    name: str
    base_model: str | None
    architecture: str
    mask_token_id: int
    k_max: int
    threshold: float | None
    training_summary: Mapping[str, Any] | None = None
    gated: bool = False
    policy: str | None = None


def check_training_summary(summary: Any) -> dict[str, Any] | None:
    """A training summary as a plain JSON-ready dict (``None`` stays ``None``).

    Known keys: ``steps`` (optimizer steps), ``data`` (what it was trained on), ``loss_kind``,
    ``loss`` (final training loss), ``agreement`` (final per-offset rate at which the student's
    argmax equals the teacher's, offset 1 first); any other key is shown as it is.

    Raises:
      TypeError: if ``summary`` is not a mapping with string keys.
    """
    if summary is None:
        return None
    if not isinstance(summary, Mapping) or not all(isinstance(key, str) for key in summary):
        raise TypeError(
            f"training_summary must be a mapping of names to values (e.g. {{'steps': 1000, "
            f"'loss': 0.4, 'agreement': [0.98, 0.9]}}), got {type(summary).__name__}"
        )
    plain: dict[str, Any] = json.loads(json.dumps(dict(summary), default=_plain))
    return plain


def base_model_name(config: Any, recorded: str | None = None) -> str | None:
    """The converted model's name: ``recorded`` if given, else from ``config._name_or_path``.

    A local directory is named by its last component (no machine paths in a card); the cached
    embedded default is named by its Hub id.
    """
    if recorded:
        return recorded
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name:
        return None
    path = Path(name).expanduser()
    if path == cache_root() / DEFAULT_MODEL_NAME:
        return HF_MODEL_ID
    if path.is_absolute() or path.exists() or not _HUB_ID.match(name):
        return path.name or None
    return name


def model_card(facts: CardFacts) -> str:
    """The Markdown of the model card (YAML front matter for the Hugging Face Hub first)."""
    base = facts.base_model
    on_hub = base is not None and _HUB_ID.match(base) is not None
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if on_hub:
        front.append(f"base_model: {base}")
    front += ["tags:", "- mtp-lm", "- multi-token-prediction", "---", ""]
    described = f"`{base}`" if base else "A transformers causal language model"
    sections = [
        "\n".join(front),
        f"# {facts.name}: multi-token prediction\n\n"
        f"{described} converted into a multi-token predictor with mtp-lm.  It is a plain "
        f"`{facts.architecture}` checkpoint with one extra token, `<mtp_mask>`: fed `k - 1` mask "
        "tokens after its context, it predicts the next `k` tokens in one forward pass.  "
        "Without masks it is an ordinary next-token model.\n",
        f"## Method\n\n{PAPER} ({PAPER_URL}).  mtp-lm converts a model by online "
        "self-distillation: a frozen copy of the base model (the teacher) labels the tokens "
        "that follow, and the model (the student) learns to predict them at the mask "
        "positions.  At inference ConfAdapt keeps, per step, the longest prefix of the "
        "proposals whose top-1 probability reaches the threshold (at least one token).\n",
        _gate_section(facts),
        _settings_section(facts),
        _training_section(facts.training_summary),
        _usage_section(facts),
    ]
    return "\n".join(section for section in sections if section)


def _gate_section(facts: CardFacts) -> str:
    if not facts.gated:
        return ""
    return (
        "## Mask-gated adapters\n\nThis model is **mask-gated** (Samragh et al. 2025, "
        "arXiv 2507.11851): its MTP ability is a low-rank adapter, `mtp_gate.safetensors`, that "
        "acts only at `<mtp_mask>` positions.  The weights file holds the base model unchanged: "
        "`AutoModelForCausalLM.from_pretrained` on this directory loads the exact base model "
        "(ordinary next-token decoding, adapter unused).  For MTP decoding load it with "
        "`mtp_torch.MTPModel.from_pretrained`, which restores the adapter; its one-token and "
        "`verify=True` outputs are exactly the base model's greedy output.\n"
    )


def _settings_section(facts: CardFacts) -> str:
    rows = [("mask token id (`mtp_mask_token_id`)", str(facts.mask_token_id))]
    if facts.policy is not None:
        rows.append(("default policy (`mtp_policy`)", f"`{facts.policy}`"))
    rows.append(("k_max, proposals per step (`mtp_k_max`)", str(facts.k_max)))
    if facts.threshold is not None:
        rows.append(("ConfAdapt threshold (`mtp_threshold`)", _format(facts.threshold)))
    return (
        "## MTP settings\n\nStored in `config.json`; `MTPModel` uses them as its defaults.\n\n"
        + (_table(("setting", "value"), rows))
    )


def _training_section(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return "## Training\n\nNo training summary was recorded with this checkpoint.\n"
    rows = [
        (label, _format(summary[key])) for key, label in _SUMMARY_LABELS.items() if key in summary
    ]
    rows += [
        (key, _format(value))
        for key, value in summary.items()
        if key not in _SUMMARY_LABELS and key != "agreement"
    ]
    text = "## Training\n\n" + (_table(("quantity", "value"), rows) if rows else "")
    agreement = summary.get("agreement")
    if isinstance(agreement, Sequence) and not isinstance(agreement, str) and agreement:
        offsets = [str(offset) for offset in range(1, len(agreement) + 1)]
        text += (
            "\nFinal per-offset agreement with the teacher (offset 1 is the next token):\n\n"
            + _table(("offset", *offsets), [("agreement", *(_format(v) for v in agreement))])
        )
    return text


def _usage_section(facts: CardFacts) -> str:
    name = facts.name
    return (
        "## Usage\n\n"
        "With transformers alone (ordinary next-token decoding; the mask token is unused):\n\n"
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
        "```\n\n"
        'With mtp-lm (`pip install "mtp-lm[torch]"`), several tokens per forward pass:\n\n'
        "```python\n"
        "from mtp_torch import ConfAdapt, MTPModel\n\n"
        f'mtp = MTPModel.from_pretrained("{name}")\n'
        'ids = mtp.tokenizer("The capital of France is", return_tensors="pt").input_ids\n'
        f"out = mtp.generate(ids, max_new_tokens=128)  # {_default_policy(facts)} from the "
        "config\n"
        f"fast = mtp.generate(ids, policy=ConfAdapt(0.8, {facts.k_max}), max_new_tokens=128)"
        "  # lower threshold: more tokens per pass\n"
        "out = mtp.generate(ids, max_new_tokens=128, verify=True)  # lossless: equals greedy\n"
        "print(mtp.tokenizer.decode(out.sequences[0]), out.tokens_per_forward)\n"
        "```\n\n"
        f'or from the command line: `mtp generate --model {name} --prompt "..."`.  Replace '
        f"`{name}` with the path of this directory (or its Hub id).\n"
    )


def _default_policy(facts: CardFacts) -> str:
    """The stored default policy as the code that builds it."""
    if facts.policy is not None and facts.policy.startswith("static:"):
        return f"StaticK({facts.policy.split(':')[1]})"
    if facts.threshold is not None:
        return f"ConfAdapt({_format(facts.threshold)}, {facts.k_max})"
    return f"the policy {facts.policy}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(item) for item in value)
    return str(value)


def _plain(value: Any) -> Any:
    """numpy / torch scalars and arrays as plain numbers and lists; anything else as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
