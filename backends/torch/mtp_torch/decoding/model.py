"""``MTPModel``: a transformers causal LM that decodes several tokens per forward pass.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section 4 (static k and ConfAdapt decoding).  This wrapper adds batched decoding with ragged
acceptance, sampling, and a lossless mode (``verify=True``) whose output equals greedy decoding.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mtp_core import AcceptancePolicy, Backend, DecodeResult, decode
from mtp_torch.decoding.backend import TorchBackend, check_backend_name, registered_backend
from mtp_torch.decoding.calibrate import auto_plan
from mtp_torch.decoding.card import CardFacts, base_model_name, check_training_summary, model_card
from mtp_torch.decoding.fused import FusedBackend, built_from, fused_unavailable_reason
from mtp_torch.decoding.gated import (
    GATE_CONFIG_KEY,
    MaskGate,
    find_mask_gate,
    gate_settings,
    load_saved_gate,
    plain_state_dict,
    write_gate_file,
)
from mtp_torch.decoding.generation import (
    GenerationPlan,
    plan_generation,
    row_stop_criterion,
    streaming_callback,
)
from mtp_torch.decoding.kernels import KernelPlan, check_linear_kernel, fixed_plan, use_kernels
from mtp_torch.decoding.mask import (
    K_MAX_CONFIG_KEY,
    MASK_TOKEN_CONFIG_KEY,
    POLICY_CONFIG_KEY,
    THRESHOLD_CONFIG_KEY,
    VERIFY_POLICY_CONFIG_KEY,
    add_mask_token,
    embedding_rows,
)
from mtp_torch.decoding.named import load_named
from mtp_torch.decoding.output import GenerateOutput as GenerateOutput
from mtp_torch.decoding.output import generate_output
from mtp_torch.decoding.policies import (
    policy_config_settings,
    policy_spec,
    policy_to_save,
    verify_policy_from_config,
)
from mtp_torch.decoding.policies import policy_from_config as _policy_from_config
from mtp_torch.decoding.saving import (
    check_model_source,
    read_manifest,
    recover_checkpoint,
    write_checkpoint,
    write_config_settings,
)
from mtp_torch.dtypes import parse_dtype as parse_dtype

__all__ = ["K_MAX_CONFIG_KEY", "THRESHOLD_CONFIG_KEY", "GenerateOutput", "MTPModel"]


ChunkCallback = Callable[[int, npt.NDArray[np.int64]], None]


class MTPModel:
    """A transformers decoder-only causal LM decoding several tokens per forward pass.

    Args:
      hf_model: a loaded ``AutoModelForCausalLM`` (any device, any dtype).
      mask_token_id: id of the ``<mtp_mask>`` token; ``None`` uses ``config.mtp_mask_token_id``
        and, when the config has none, adds a mask token (see ``add_mask_token``).
      tokenizer: the model's tokenizer (optional; gets the mask token when one is added).
      linear_kernel: ``"stock"`` (the default: PyTorch's own products, exactly transformers'
        numerics), ``"skinny"`` (the weight-first CPU product), ``"native"`` (the compiled
        few-row kernel) or ``"auto"`` (the fastest per pass width, measured once on this
        machine and cached).  The non-stock kernels also run few-query attention with a
        plain product; they agree with stock to rounding and are applied per call (another
        thread decoding the same model keeps its own kernel).  See
        ``mtp_torch.decoding.kernels``.
      backend: the name of a registered decoding backend (``mtp_core.register_backend`` or
        the ``mtp_core.backends`` entry points) that ``generate`` runs on: the registered
        object is called with the transformers model and returns an ``mtp_core.Backend``.
        ``None`` (the default): the built-in choice, ``decoding_backend``.
      packed_weights: under ``"native"``/``"auto"``, read GGUF Q4_1/Q8_0 codes packed (same bits,
        less MTP gain; ``mtp_torch.decoding.packing``; settable); ``None``: if MTP_LM_PACKED=1.

    Attributes:
      model: the wrapped transformers model.
      tokenizer: the tokenizer, or ``None``.
      mask_token_id: the mask token id (also stored as ``model.config.mtp_mask_token_id``).
      default_policy: the policy the config stores (``mtp_policy``, a spec such as
        ``"static:3"``; a save from before that key: ``ConfAdapt`` from ``mtp_threshold`` /
        ``mtp_k_max``), else ``ConfAdapt()``; see ``mtp_torch.decoding.policies``.
      verify_policy: the policy ``verify=True`` drafts with when none is given (``mtp_verify_policy``
        in the config; ``None``: ``default_policy``).
      base_model: name of the model that was converted, for the model card (``None``: taken
        from ``config._name_or_path``; ``from_pretrained`` restores the one a save recorded).
      linear_kernel: the kernel decoding runs its ``Linear`` layers with (settable); the plan
        it resolves to is ``kernel_plan()``.
      backend_name: the registered backend ``generate`` runs on, or ``None`` (settable).
      training_summary: what training reported (steps, data, loss, per-offset agreement ...),
        shown in the model card; ``None`` when unknown.  See ``save_pretrained``.

    Raises:
      ValueError: for a mask id outside the embedding matrix, a model the backend cannot
        serve (see ``TorchBackend``), an unknown ``linear_kernel`` or an unregistered
        ``backend``.
    """

    def __init__(
        self,
        hf_model: Any,
        mask_token_id: int | None = None,
        tokenizer: Any = None,
        *,
        linear_kernel: str = "stock",
        backend: str | None = None,
        packed_weights: bool | None = None,
    ):
        self.linear_kernel = check_linear_kernel(linear_kernel)
        self.backend_name = check_backend_name(backend)
        self.packed_weights = packed_weights
        self._auto_plans: dict[int, KernelPlan] = {}
        self._fused: tuple[tuple[Any, ...], FusedBackend] | None = None  # (built_from, backend)
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
        self.verify_policy = verify_policy_from_config(config, self.default_policy)
        # What a LoRA conversion changed, as a compact low-rank delta (``distill`` sets it).
        self.delta: dict[str, torch.Tensor] | None = None
        self.base_model: str | None = None
        self.training_summary: Mapping[str, Any] | None = None

    @property
    def gate(self) -> MaskGate | None:
        """The model's mask gate (``DistillConfig(lora_gate="mask")``), or ``None`` for a plain
        or merged conversion.  On a gated model every real token's logits are bitwise the base
        model's (``mtp_torch.decoding.gated``)."""
        return find_mask_gate(self.model)

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike[str],
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        *,
        linear_kernel: str = "stock",
        backend: str | None = None,
        packed_weights: bool | None = None,
    ) -> MTPModel:
        """Load a converted MTP checkpoint, a plain checkpoint, or the embedded default model.

        Args:
          path_or_name: a directory written by ``save_pretrained`` (mask id and default policy
            come from its config), any other transformers causal-LM directory or Hub id (a mask
            token is added), ``"default"`` (the embedded default, converted by the delta that
            ships in the package) or ``"default-base"`` (the same model unconverted).
          dtype: parameter dtype (``torch.dtype``, a name such as ``"bfloat16"``, or ``"auto"``);
            ``None`` is float32.  A mask-gated save (config key ``mtp_gate``) gets its gate
            back from ``mtp_gate.safetensors``.
          device: where to put the model (``None``: CPU).
          linear_kernel: ``"stock"``, ``"skinny"``, ``"native"`` or ``"auto"`` (see the class).
          backend: a registered decoding backend's name, or ``None`` (see the class).
          packed_weights: read GGUF-coded weights packed (see the class).

        Returns:
          The ``MTPModel``, its model in eval mode.

        Raises:
          FileNotFoundError: for a source that holds no model, or a gated save whose adapter
            file is missing.
          ValueError: for corrupt weights or a gate adapter that is corrupt or does not fit.
        """
        # Lazy: transformers' Auto classes import their model registry (start-up of import mtp_torch).
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = str(path_or_name)
        options: dict[str, Any] = {"linear_kernel": linear_kernel, "backend": backend}
        options["packed_weights"] = packed_weights
        wanted = parse_dtype(dtype)
        named = load_named(source, wanted if isinstance(wanted, torch.dtype) else torch.float32)
        if named is not None:
            named_model, named_tokenizer = named
            if device is not None:
                named_model.to(device)
            return cls(named_model, tokenizer=named_tokenizer, **options)
        recover_checkpoint(source)  # a save killed midway: its earlier save back, copies swept
        source = check_model_source(source)
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
        mtp = cls(model, tokenizer=tokenizer, **options)
        load_saved_gate(model, mtp.mask_token_id, Path(source).expanduser())
        manifest = read_manifest(Path(source).expanduser())
        if isinstance(manifest.get("base_model"), str):
            mtp.base_model = manifest["base_model"]
        if isinstance(manifest.get("training_summary"), dict):
            mtp.training_summary = manifest["training_summary"]
        return mtp

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        k_max: int | None = None,
        threshold: float | None = None,
        *,
        overwrite: bool = False,
        training_summary: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a plain transformers checkpoint plus the MTP settings and a model card, atomically.

        The directory holds safetensors weights, the tokenizer (if any), a config carrying
        ``mtp_mask_token_id`` and the default policy (``mtp_policy``, its spec, which
        ``from_pretrained`` reads back as an equal policy; ``mtp_k_max``; ``mtp_threshold`` for
        a ConfAdapt), a model card (``README.md``:
        base model, method, MTP settings, training summary, how to load it) and a manifest of
        the files written (``mtp_lm_manifest.json``); stock ``AutoModelForCausalLM`` loads it
        unchanged.  A mask-gated model (``gate``) also writes its adapter, ``mtp_gate.safetensors``,
        and the gate's settings (config key ``mtp_gate``): the weights file holds the base model
        unchanged, so ``AutoModelForCausalLM`` loads the exact base model, and
        ``from_pretrained`` restores the gate.  Everything is written to a temporary directory beside ``directory``:

        - a new or empty directory, or an earlier mtp-lm save holding only its own files, is
          replaced by a rename (a reader sees the old save or the new one, never a mix);
        - a directory holding other files is refused unless ``overwrite=True``; then the new
          files replace same-named ones one by one and the files of an earlier save that the new
          one lacks are removed, but files this method did not write are never deleted (a
          ``README.md`` of the user's own is kept, and no card is written).

        Args:
          directory: output directory.
          k_max: ``k_max`` of a ConfAdapt to store as the default.  Given this or ``threshold``,
            the stored default is a ConfAdapt, the setting not given taken from the current
            ``default_policy``; given neither, ``default_policy`` is stored as it is.
          threshold: threshold of a ConfAdapt to store as the default (see ``k_max``).
          overwrite: write into a directory that holds files of its own.
          training_summary: what training reported, for the card: ``steps``, ``data``,
            ``loss_kind``, ``loss`` (final), ``agreement`` (final per-offset rates, offset 1
            first) and any other entries; ``None`` uses ``self.training_summary``.

        Returns:
          The directory written.

        Raises:
          ValueError: if ``k_max`` or ``threshold`` is out of range, or the policy to store has
            no spec (a policy ``parse_policy`` cannot read: set ``default_policy`` to a
            ``ConfAdapt`` or ``StaticK``, or pass ``k_max`` / ``threshold``).
          TypeError: if ``training_summary`` is not a mapping.
          FileExistsError: if ``directory`` holds files other than an earlier save's and
            ``overwrite`` is false, or is a file.
        """
        stored = policy_config_settings(policy_to_save(self.default_policy, k_max, threshold))
        summary = check_training_summary(
            self.training_summary if training_summary is None else training_summary
        )
        target = Path(directory)
        config = self.model.config
        facts = CardFacts(
            name=target.name or target.resolve().name,
            base_model=base_model_name(config, self.base_model),
            architecture=type(self.model).__name__,
            mask_token_id=self.mask_token_id,
            k_max=stored[K_MAX_CONFIG_KEY],
            threshold=stored[THRESHOLD_CONFIG_KEY],
            training_summary=summary,
            gated=self.gate is not None,
            policy=stored[POLICY_CONFIG_KEY],
        )
        settings: dict[str, Any] = {MASK_TOKEN_CONFIG_KEY: self.mask_token_id, **stored}
        verify = self.verify_policy  # null: verification drafts with the default policy
        settings[VERIFY_POLICY_CONFIG_KEY] = None if verify is None else policy_spec(verify)
        if self.gate is not None:
            settings[GATE_CONFIG_KEY] = gate_settings(self.gate)
        return write_checkpoint(
            target,
            lambda staging: self._write_files(staging, settings),
            overwrite=overwrite,
            card=model_card(facts),
            metadata={"base_model": facts.base_model, "training_summary": summary},
        )

    def _write_files(self, staging: Path, settings: Mapping[str, Any]) -> None:
        """Config settings, weights (a gated model's base weights as loaded, its gate in its
        own file) and tokenizer, into ``staging``."""
        # The base weights under their original names, read without unwrapping the live
        # model's gated layers (another thread may be decoding with them meanwhile).
        state = plain_state_dict(self.model) if self.gate is not None else None
        self.model.save_pretrained(staging, state_dict=state)
        # The settings go into the staged file, never onto the live config (which other
        # threads read and save concurrently).
        write_config_settings(staging, settings)
        if self.gate is not None:
            write_gate_file(self.model, staging)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(staging)

    # ------------------------------------------------------------------------------------------
    # Decoding

    def generate(
        self,
        input_ids: torch.Tensor,
        policy: AcceptancePolicy | None = None,
        max_new_tokens: int | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        verify: bool = False,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int = 0,
        on_chunk: ChunkCallback | None = None,
        generation_config: Any = None,
        streamer: Any = None,
        stopping_criteria: Any = None,
        stop_strings: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
    ) -> GenerateOutput:
        """Decode a batch of prompts, several tokens per forward pass (transformers' arguments).

        Args:
          input_ids: ``(batch, prompt_len)`` (or ``(prompt_len,)``) prompt token ids, left-padded
            when the prompts differ in length.
          policy: how many proposals to keep per step (``StaticK(k)``, ``ConfAdapt(...)``);
            ``None`` uses ``default_policy`` (with ``verify``: ``verify_policy`` when set).
          max_new_tokens: budget per row; ``None``: ``generation_config``'s (or its
            ``max_length`` less the prompt width), else 256.
          attention_mask: ``(batch, prompt_len)`` 1 for real prompt tokens, 0 for padding;
            ``None``: tokens equal to a pad id that is not an EOS id are padding (transformers).
          eos_token_id: stop token id(s); ``None``: the generation config's, else the model's.
          verify: lossless mode: the same weights verify their own proposals, so the output
            equals greedy decoding exactly (requires greedy decoding).
          temperature: 0 for greedy; ``None``: the generation config's if it has ``do_sample``,
            else 0.  ``top_p`` (in ``(0, 1]``) and ``top_k`` (0: off) filter what is sampled.
          seed: seed of the sampling draws (same seed, same output).
          on_chunk: called as ``on_chunk(row, token_ids)`` with each row's newly emitted tokens.
          generation_config: a ``transformers.GenerationConfig`` supplying what the arguments
            leave unset (explicit arguments win; its unset fields come from the model's own);
            beam search and logits processors are refused.
          streamer: a transformers streamer (``TextStreamer`` ...), batch size 1: ``put`` gets
            the prompt, then each step's new tokens (1-D, several with MTP), then ``end()``.
          stopping_criteria: transformers ``StoppingCriteria`` (a list or a
            ``StoppingCriteriaList``), called per row after every new token with the row's
            ``(1, prompt_len + n)`` ids and ``scores=None``; ``True`` ends the row there like EOS.
          stop_strings: end a row once its text ends with one of these strings (transformers'
            ``StopStringCriteria``; the completing token is kept); needs a tokenizer.
          tokenizer: the tokenizer for ``stop_strings``; ``None`` uses ``self.tokenizer``.
          pad_token_id: id after a finished row (``None``: the config's, else the first stop id).

        Returns:
          A ``GenerateOutput``.

        Raises:
          ValueError: for an empty prompt, a prompt and budget beyond the context window, bad
            sampling settings, ``verify`` with sampling, an unsupported generation config, stop
            strings without a tokenizer, or a streamer with several prompts.
        """
        ids = self._check_input_ids(input_ids)
        plan = plan_generation(
            self.model,
            ids.shape[1],
            generation_config,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stopping_criteria=stopping_criteria,
            stop_strings=stop_strings,
            tokenizer=self.tokenizer if tokenizer is None else tokenizer,
            verify=verify,
        )
        mask = self._attention_mask(ids, attention_mask, plan)
        chosen = self._check_policy(policy, streamer, ids.shape[0], verify)
        result, elapsed, first = self._run_engine(
            ids, mask, chosen, plan, streamer=streamer, verify=verify, seed=seed, on_chunk=on_chunk
        )
        return generate_output(ids, result, plan, elapsed, first)

    def _check_policy(
        self, policy: Any, streamer: Any, batch: int, verify: bool
    ) -> AcceptancePolicy:
        """The policy to decode with (``None``: the default, for verify ``verify_policy`` if
        set); a streamer needs one prompt."""
        default = (self.verify_policy if verify else None) or self.default_policy
        chosen = default if policy is None else policy
        if not isinstance(chosen, AcceptancePolicy):
            raise ValueError(
                f"policy must be an acceptance policy such as StaticK(k) or ConfAdapt(...), "
                f"got {chosen!r}"
            )
        if streamer is not None and batch != 1:
            raise ValueError(
                f"a streamer follows one sequence, but input_ids holds {batch} prompts; stream "
                "batch size 1 (as transformers requires), or use on_chunk(row, token_ids)"
            )
        return chosen

    def _run_engine(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        policy: AcceptancePolicy,
        plan: GenerationPlan,
        *,
        streamer: Any,
        on_chunk: ChunkCallback | None,
        **options: Any,
    ) -> tuple[DecodeResult, float, float]:
        """``mtp_core.decode`` of the real tokens of ``ids`` in eval mode, its seconds, and the
        seconds until the first step's tokens (the prompt's pass).

        A ``streamer`` gets the prompt first, then each step's tokens, then ``end()`` (also on
        error, so that a ``TextIteratorStreamer``'s reader never waits forever).
        """
        ids_host, mask_host = ids.cpu(), mask.cpu()
        prompts = [ids_host[row][mask_host[row]].tolist() for row in range(ids_host.shape[0])]
        was_training = bool(self.model.training)
        if any(module.training for module in self.model.modules()):
            self.model.eval()  # a walk that sets every module's flag: only when one needs it
        if streamer is not None:
            streamer.put(ids_host)
        kernel_plan = self.kernel_plan()
        backend = self.decoding_backend(kernel_plan)
        # The fused pass runs its own products; the Linear swap is for transformers' forward.
        fused = isinstance(backend, FusedBackend)
        kernel = contextlib.nullcontext() if fused else use_kernels(kernel_plan, self.model)
        chunks = streaming_callback(streamer, on_chunk)
        first: list[float] = []

        def timed(row: int, tokens: Any) -> None:
            if not first:
                first.append(time.perf_counter())
            if chunks is not None:
                chunks(row, tokens)

        start = time.perf_counter()
        try:
            with kernel:
                result = decode(
                    backend,
                    prompts,
                    policy,
                    mask_token_id=self.mask_token_id,
                    max_new_tokens=plan.max_new_tokens,
                    stop_token_ids=plan.stop_ids,
                    sampling=plan.sampling,
                    # Padding slots of a block are never read or attended; the mask id is
                    # always a valid embedding row (a model's pad id need not be).
                    pad_token_id=self.mask_token_id,
                    max_length=self.backend.max_length,
                    vocab_size=embedding_rows(self.model),
                    on_chunk=timed,
                    stop_criterion=row_stop_criterion(plan.criteria, ids),
                    **options,
                )
        finally:
            if was_training:
                self.model.train()
            if streamer is not None:
                streamer.end()
        elapsed = time.perf_counter() - start
        return result, elapsed, (first[0] - start) if first else elapsed

    def decoding_backend(self, plan: KernelPlan | None = None) -> Backend[Any]:
        """The backend ``generate`` runs on under ``plan`` (default ``kernel_plan()``): the
        registered backend ``backend_name`` names, built for this model, when it is set; else
        the one-call ``FusedBackend`` where the plan runs the native kernel and the model
        qualifies (``mtp_torch.decoding.fused``), else ``self.backend`` (transformers'
        forward)."""
        if self.backend_name is not None:
            return registered_backend(self.backend_name, self.model)
        plan = self.kernel_plan() if plan is None else plan
        if "native" not in plan.widths:
            return self.backend
        key = (plan, built_from(self.model), self.packed_weights)
        if self._fused is not None and self._fused[0] == key:
            return self._fused[1]  # the same weights and plan: the backend built before
        if fused_unavailable_reason(self.model) is not None:
            return self.backend
        backend = FusedBackend(self.model, plan, packed_weights=self.packed_weights)
        self._fused = (key, backend)
        return backend

    def kernel_plan(self) -> KernelPlan:
        """The per-width plan ``linear_kernel`` stands for (``"auto"``: measured once, cached).

        Raises:
          ValueError: for an unknown ``linear_kernel``.
        """
        kernel = check_linear_kernel(self.linear_kernel)
        if kernel != "auto":
            return fixed_plan(kernel)
        threads = torch.get_num_threads()
        if threads not in self._auto_plans:
            self._auto_plans[threads] = auto_plan(self.model)
        return self._auto_plans[threads]

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

    def _attention_mask(
        self, ids: torch.Tensor, attention_mask: Any, plan: GenerationPlan
    ) -> torch.Tensor:
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
        pad = plan.mask_pad_id
        if pad is not None and pad not in plan.mask_eos_ids and bool((ids == pad).any()):
            return ids != pad
        return torch.ones_like(ids, dtype=torch.bool)
