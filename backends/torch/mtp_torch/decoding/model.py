"""``MTPModel``: a transformers causal LM that decodes several tokens per forward pass.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section 4 (static k and ConfAdapt decoding).  This wrapper adds batched decoding with ragged
acceptance, sampling, and a lossless mode (``verify=True``) whose output equals greedy decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt
import torch

from mtp_core import AcceptancePolicy, ConfAdapt, Sampling, decode
from mtp_torch.decoding.backend import TorchBackend
from mtp_torch.decoding.mask import MASK_TOKEN_CONFIG_KEY, add_mask_token, embedding_rows
from mtp_torch.text import as_token_ids, stop_token_ids

__all__ = ["K_MAX_CONFIG_KEY", "THRESHOLD_CONFIG_KEY", "GenerateOutput", "MTPModel"]

K_MAX_CONFIG_KEY = "mtp_k_max"
THRESHOLD_CONFIG_KEY = "mtp_threshold"

ChunkCallback = Callable[[int, npt.NDArray[np.int64]], None]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a dtype name (``"float32"``, ``"bf16"``, ``"auto"`` ...) into a ``torch.dtype``.

    Args:
      dtype: a ``torch.dtype``, one of the names above, ``"auto"`` (the checkpoint's dtype) or
        ``None`` (float32).

    Returns:
      The ``torch.dtype``, or ``"auto"``.

    Raises:
      ValueError: for an unknown name.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


@attrs.frozen(eq=False)
class GenerateOutput:
    """What ``MTPModel.generate`` returns.

    Attributes:
      sequences: ``(batch, prompt_len + generated)`` int64 token ids: the prompts as given
        (left padding included), then each row's generated tokens, then ``pad_token_id`` after a
        row finished, like ``transformers``' ``generate``.
      num_forward_passes: model forward calls made for the whole batch.
      tokens_per_forward: generated tokens per forward pass, averaged over rows (the paper's
        acceleration factor).
      accepted_histogram: ``accepted_histogram[n]`` counts row-steps that emitted ``n`` tokens.
      elapsed_s: wall-clock seconds spent decoding.
      num_new_tokens: ``(batch,)`` generated tokens per row (stop token included).
    """

    sequences: torch.Tensor
    num_forward_passes: int
    tokens_per_forward: float
    accepted_histogram: npt.NDArray[np.int64]
    elapsed_s: float
    num_new_tokens: npt.NDArray[np.int64]


def _policy_from_config(config: Any) -> ConfAdapt:
    """ConfAdapt with the ``mtp_threshold`` / ``mtp_k_max`` stored in a config, else defaults."""
    settings: dict[str, Any] = {}
    threshold = getattr(config, THRESHOLD_CONFIG_KEY, None)
    k_max = getattr(config, K_MAX_CONFIG_KEY, None)
    if threshold is not None:
        settings["threshold"] = float(threshold)
    if k_max is not None:
        settings["k_max"] = int(k_max)
    return ConfAdapt(**settings)


def _check_model_source(source: str) -> None:
    """Raise ``FileNotFoundError`` for a local path that cannot hold a model (before the Hub)."""
    path = Path(source).expanduser()
    looks_local = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json, so it is not a model directory; pass a directory "
                "written by save_pretrained (or mtp convert)"
            )
    elif path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the model's directory")
    elif looks_local:
        raise FileNotFoundError(
            f"model directory {path} does not exist; check the path, or use 'default' / "
            "'default-base' for the embedded default"
        )


_MANIFEST = "mtp_lm_manifest.json"


def _manifest_files(directory: Path) -> set[str]:
    """Files an earlier ``save_pretrained`` wrote into ``directory`` (its manifest), else none."""
    try:
        listed = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {str(name) for name in listed} | {_MANIFEST}


def _foreign_files(target: Path) -> list[str]:
    """Names in ``target`` that no earlier mtp-lm save wrote (``[]`` for a new directory)."""
    if target.is_file():
        raise FileExistsError(f"{target} is a file; give a directory path to save into")
    if not target.is_dir():
        return []
    ours = _manifest_files(target)
    return sorted(p.name for p in target.iterdir() if p.name not in ours)


def _umask_permissions(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the mode a plain ``mkdir`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)


def _sync_directory(directory: Path) -> None:
    """fsync every file of ``directory`` and the directory itself (data on disk before renames)."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_directory(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` by renames; an earlier save there is removed afterwards."""
    backup = None
    if target.exists():
        backup = target.parent / f".{target.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _merge_into(staging: Path, target: Path) -> None:
    """Move ``staging``'s files into ``target`` one by one, keeping files mtp-lm did not write."""
    stale = _manifest_files(target) - {p.name for p in staging.iterdir()}
    for path in sorted(staging.iterdir(), key=lambda p: p.name == _MANIFEST):
        os.replace(path, target / path.name)  # the manifest last: it names a complete save
    for name in stale:
        (target / name).unlink(missing_ok=True)


class MTPModel:
    """A transformers decoder-only causal LM decoding several tokens per forward pass.

    Args:
      hf_model: a loaded ``AutoModelForCausalLM`` (any device, any dtype).
      mask_token_id: id of the ``<mtp_mask>`` token; ``None`` uses ``config.mtp_mask_token_id``
        and, when the config has none, adds a mask token (see ``add_mask_token``).
      tokenizer: the model's tokenizer (optional; gets the mask token when one is added).

    Attributes:
      model: the wrapped transformers model.
      tokenizer: the tokenizer, or ``None``.
      mask_token_id: the mask token id (also stored as ``model.config.mtp_mask_token_id``).
      default_policy: ``ConfAdapt`` built from the config keys ``mtp_threshold`` / ``mtp_k_max``
        when present, else ``ConfAdapt()``.

    Raises:
      ValueError: for a mask id outside the embedding matrix, or a model the backend cannot
        serve (see ``TorchBackend``).
    """

    def __init__(self, hf_model: Any, mask_token_id: int | None = None, tokenizer: Any = None):
        self.model = hf_model
        self.tokenizer = tokenizer
        self.backend = TorchBackend(hf_model)
        config = hf_model.config
        if mask_token_id is None:
            mask_token_id = getattr(config, MASK_TOKEN_CONFIG_KEY, None)
        if mask_token_id is None:
            mask_token_id = add_mask_token(hf_model, tokenizer)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, (int, np.integer)):
            raise TypeError(
                f"mask_token_id must be an integer token id (or None to add a mask token), got "
                f"{mask_token_id!r}"
            )
        rows = embedding_rows(hf_model)
        if isinstance(mask_token_id, bool) or not 0 <= int(mask_token_id) < rows:
            raise ValueError(
                f"mask_token_id={mask_token_id} is outside the model's vocabulary [0, {rows}); "
                "pass mask_token_id=None to add a mask token (or use mtp_torch.add_mask_token)"
            )
        self.mask_token_id = int(mask_token_id)
        setattr(config, MASK_TOKEN_CONFIG_KEY, self.mask_token_id)
        self.default_policy: AcceptancePolicy = _policy_from_config(config)
        # What a LoRA conversion changed, as a compact low-rank delta (``distill`` sets it).
        self.delta: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike[str],
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> MTPModel:
        """Load a converted MTP checkpoint, a plain checkpoint, or the embedded default model.

        Args:
          path_or_name: a directory written by ``save_pretrained`` (mask id and default policy
            come from its config), any other transformers causal-LM directory or Hub id (a mask
            token is added), ``"default"`` (the embedded default, converted by the delta that
            ships in the package) or ``"default-base"`` (the same model unconverted).
          dtype: parameter dtype (``torch.dtype``, a name such as ``"bfloat16"``, or ``"auto"``);
            ``None`` is float32.
          device: where to put the model (``None``: CPU).

        Returns:
          The ``MTPModel``, its model in eval mode.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mtp_torch.weights.default import load_named

        source = str(path_or_name)
        wanted = parse_dtype(dtype)
        named = load_named(source, wanted if isinstance(wanted, torch.dtype) else torch.float32)
        if named is not None:
            named_model, named_tokenizer = named
            if device is not None:
                named_model.to(device)
            return cls(named_model, tokenizer=named_tokenizer)
        _check_model_source(source)
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                source, dtype=parse_dtype(dtype), trust_remote_code=False
            )
        except Exception as error:  # safetensors' own error type is not an OSError
            if not isinstance(error, OSError) and "safetensor" not in type(error).__name__.lower():
                raise
            if not isinstance(error, OSError):
                raise ValueError(
                    f"the weights in {source} cannot be read ({' '.join(str(error).split())}); "
                    "the file is truncated or corrupt: save or download it again"
                ) from error
            raise FileNotFoundError(
                f"cannot load a model from {source!r}: {' '.join(str(error).split())[:300]}; "
                "pass a directory written by save_pretrained (or mtp convert), 'default' or "
                "'default-base'"
            ) from error
        if device is not None:
            model.to(device)
        model.eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return cls(model, tokenizer=tokenizer)

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        k_max: int | None = None,
        threshold: float | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write a plain transformers checkpoint plus the MTP settings, atomically.

        The directory holds safetensors weights, the tokenizer (if any), a config carrying
        ``mtp_mask_token_id``, ``mtp_k_max`` and ``mtp_threshold``, and a manifest of the files
        written (``mtp_lm_manifest.json``); stock ``AutoModelForCausalLM.from_pretrained`` loads
        it unchanged.  Everything is written to a temporary directory beside ``directory``:

        - a new or empty directory, or an earlier mtp-lm save holding only its own files, is
          replaced by a rename (a reader sees the old save or the new one, never a mix);
        - a directory holding other files is refused unless ``overwrite=True``; then the new
          files replace same-named ones one by one and the files of an earlier save that the new
          one lacks are removed, but files this method did not write are never deleted.

        Args:
          directory: output directory.
          k_max: default ``k_max`` to store; ``None`` keeps the current default policy's.
          threshold: default ConfAdapt threshold to store; ``None`` keeps the current one's.
          overwrite: write into a directory that holds files of its own.

        Returns:
          The directory written.

        Raises:
          ValueError: if ``k_max`` or ``threshold`` is out of range.
          FileExistsError: if ``directory`` holds files other than an earlier save's and
            ``overwrite`` is false, or is a file.
        """
        current = self.default_policy
        base = current if isinstance(current, ConfAdapt) else ConfAdapt()
        policy = ConfAdapt(
            threshold=base.threshold if threshold is None else threshold,
            k_max=base.k_max if k_max is None else k_max,
        )
        target = Path(directory)
        foreign = _foreign_files(target)
        if foreign and not overwrite:
            raise FileExistsError(
                f"{target} holds files mtp-lm did not write ({', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}); choose an empty or new directory, or "
                "pass overwrite=True (--overwrite) to write beside them"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        config = self.model.config
        previous = {
            key: getattr(config, key, None) for key in (K_MAX_CONFIG_KEY, THRESHOLD_CONFIG_KEY)
        }
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        _umask_permissions(staging)
        try:
            setattr(config, MASK_TOKEN_CONFIG_KEY, self.mask_token_id)
            setattr(config, K_MAX_CONFIG_KEY, int(policy.k_max))
            setattr(config, THRESHOLD_CONFIG_KEY, float(policy.threshold))
            self.model.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            written = sorted(p.name for p in staging.iterdir())
            (staging / _MANIFEST).write_text(
                json.dumps({"format": 1, "files": written}), encoding="utf-8"
            )
            _sync_directory(staging)
            if foreign:
                _merge_into(staging, target)
            else:
                _replace_directory(staging, target)
        finally:
            for key, value in previous.items():
                setattr(config, key, value)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target

    # ------------------------------------------------------------------------------------------
    # Decoding

    def generate(
        self,
        input_ids: torch.Tensor,
        policy: AcceptancePolicy | None = None,
        max_new_tokens: int = 256,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        verify: bool = False,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        on_chunk: ChunkCallback | None = None,
    ) -> GenerateOutput:
        """Decode a batch of prompts, several tokens per forward pass.

        Args:
          input_ids: ``(batch, prompt_len)`` (or ``(prompt_len,)``) prompt token ids, left-padded
            when the prompts differ in length.
          policy: how many proposals to keep per step (``StaticK(k)``, ``ConfAdapt(...)``);
            ``None`` uses ``default_policy``.
          max_new_tokens: generation budget per row.
          attention_mask: ``(batch, prompt_len)`` 1 for real prompt tokens, 0 for padding; when
            ``None`` it is inferred like transformers does (tokens equal to a pad id that is not
            an EOS id are padding), else every token is real.
          eos_token_id: stop token id(s); ``None`` uses ``generation_config.eos_token_id``.
          verify: lossless mode: the same weights verify their own proposals, so the output
            equals greedy decoding exactly (requires ``temperature == 0``).
          temperature: 0 for greedy; else sampling temperature of every read position.
          top_p: nucleus mass kept when sampling, in ``(0, 1]``.
          top_k: keep only the k most likely tokens when sampling; 0 disables it.
          seed: seed of the sampling draws (same seed, same output).
          on_chunk: called as ``on_chunk(row, token_ids)`` with each row's newly emitted tokens.

        Returns:
          A ``GenerateOutput``.

        Raises:
          ValueError: for an empty prompt, a prompt that cannot fit ``max_new_tokens`` more
            tokens in the context window, bad sampling settings, or ``verify`` with sampling.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise TypeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        ids = self._check_input_ids(input_ids)
        mask = self._attention_mask(ids, attention_mask)
        stop_ids = stop_token_ids(eos_token_id, self.model)
        pad_token_id = self._pad_token_id(stop_ids)
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k)
        chosen = self.default_policy if policy is None else policy
        if not isinstance(chosen, AcceptancePolicy):
            raise ValueError(
                f"policy must be an acceptance policy such as StaticK(k) or ConfAdapt(...), "
                f"got {chosen!r}"
            )
        ids_host = ids.cpu()
        mask_host = mask.cpu()
        prompts = [ids_host[row][mask_host[row]].tolist() for row in range(ids_host.shape[0])]
        was_training = bool(self.model.training)
        self.model.eval()
        start = time.perf_counter()
        try:
            result = decode(
                self.backend,
                prompts,
                chosen,
                mask_token_id=self.mask_token_id,
                max_new_tokens=int(max_new_tokens),
                stop_token_ids=stop_ids,
                verify=verify,
                sampling=sampling,
                seed=seed,
                # Padding slots of a block are never read or attended; the mask id is always a
                # valid embedding row (a model's pad id need not be).
                pad_token_id=self.mask_token_id,
                max_length=self.backend.max_length,
                vocab_size=embedding_rows(self.model),
                on_chunk=on_chunk,
            )
        finally:
            if was_training:
                self.model.train()
        elapsed = time.perf_counter() - start
        lengths = np.asarray([len(tokens) for tokens in result.tokens], dtype=np.int64)
        generated = int(lengths.max()) if lengths.size else 0
        sequences = torch.full(
            (ids.shape[0], ids.shape[1] + generated), pad_token_id, dtype=torch.long
        )
        sequences[:, : ids.shape[1]] = ids_host
        for row, tokens in enumerate(result.tokens):
            sequences[row, ids.shape[1] : ids.shape[1] + len(tokens)] = torch.from_numpy(tokens)
        return GenerateOutput(
            sequences=sequences.to(ids.device),
            num_forward_passes=int(result.num_forward_passes),
            tokens_per_forward=float(result.tokens_per_forward),
            accepted_histogram=result.accepted_histogram,
            elapsed_s=elapsed,
            num_new_tokens=lengths,
        )

    def _check_input_ids(self, input_ids: Any) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"input_ids must be a torch.LongTensor of shape (batch, prompt_len), got "
                f"{type(input_ids).__name__}; use tokenizer(..., return_tensors='pt')"
            )
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        if input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must have shape (batch, prompt_len), got {tuple(input_ids.shape)}"
            )
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompts: pass at least one row of token ids")
        ids: torch.Tensor = input_ids.long()
        rows = embedding_rows(self.model)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
            raise ValueError(
                f"input_ids hold token ids outside the model's vocabulary [0, {rows}) (min "
                f"{int(ids.min())}, max {int(ids.max())}); encode prompts with this model's "
                "tokenizer"
            )
        return ids

    def _attention_mask(self, ids: torch.Tensor, attention_mask: Any) -> torch.Tensor:
        """Boolean ``(batch, prompt_len)`` mask of real prompt tokens."""
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape "
                    f"{tuple(ids.shape)}; pass the mask returned by the tokenizer with the ids"
                )
            return mask.to(device=ids.device).bool()
        generation_config = getattr(self.model, "generation_config", None)
        pad = getattr(generation_config, "pad_token_id", None)
        eos = as_token_ids(getattr(generation_config, "eos_token_id", None))
        if pad is not None and int(pad) not in eos and bool((ids == int(pad)).any()):
            return ids != int(pad)
        return torch.ones_like(ids, dtype=torch.bool)

    def _pad_token_id(self, stop_ids: list[int]) -> int:
        generation_config = getattr(self.model, "generation_config", None)
        pad = getattr(generation_config, "pad_token_id", None)
        if pad is not None:
            return int(as_token_ids(pad)[0])
        if stop_ids:
            return stop_ids[0]
        return 0
