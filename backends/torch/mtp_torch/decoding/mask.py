"""Adding the ``<mtp_mask>`` token to a pretrained causal LM.

The only change MTP makes to the architecture is one new special token whose embedding row (and
un-embedding row, when not tied) starts from the statistics of the existing rows; where the
embedding matrix has spare padded rows, one of them is used and nothing is resized.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019,
section 3 (the mask token).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mtp_core import MASK_TOKEN_CONFIG_KEY as MASK_TOKEN_CONFIG_KEY

__all__ = [
    "K_MAX_CONFIG_KEY",
    "MASK_TOKEN",
    "MASK_TOKEN_CONFIG_KEY",
    "POLICY_CONFIG_KEY",
    "VERIFY_POLICY_CONFIG_KEY",
    "THRESHOLD_CONFIG_KEY",
    "HFModel",
    "add_mask_token",
    "embedding_rows",
]

logger = logging.getLogger(__name__)

MASK_TOKEN = "<mtp_mask>"
# The MTP settings a converted checkpoint stores in its config.json: the default policy's spec
# (``decoding/policies.py`` writes and reads it), its positions per step and, for a ConfAdapt,
# its threshold (which saves from before ``mtp_policy`` hold alone).
POLICY_CONFIG_KEY = "mtp_policy"
# The policy ``verify=True`` drafts with when none is given (a spec; absent: the default policy).
VERIFY_POLICY_CONFIG_KEY = "mtp_verify_policy"
K_MAX_CONFIG_KEY = "mtp_k_max"
THRESHOLD_CONFIG_KEY = "mtp_threshold"


# transformers' PreTrainedModel is only partly typed (its modules' attributes read as
# ``Tensor | Module``), so models are ``Any`` here and checked by behaviour in the tests.
HFModel = Any


def embedding_rows(model: HFModel) -> int:
    """Number of rows of the model's input embedding matrix (the usable token ids).

    Args:
      model: a transformers model.

    Returns:
      ``num_embeddings`` of ``model.get_input_embeddings()``.
    """
    weight: torch.Tensor = model.get_input_embeddings().weight
    return int(weight.shape[0])


def _untied_output(model: HFModel) -> Any:
    """The un-embedding module when it holds its own weight (not tied to the input embedding)."""
    output = model.get_output_embeddings()
    if output is None:
        return None
    if output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        return None
    return output


def _statistics_init(
    weight: torch.Tensor, num_real: int, generator: torch.Generator
) -> torch.Tensor:
    """One row drawn from a normal with the per-dimension mean and std of the real rows.

    Args:
      weight: ``(rows, hidden)`` embedding or un-embedding weight.
      num_real: the first ``num_real`` rows are real tokens (spare padded rows are excluded).
      generator: a CPU generator seeding the draw.

    Returns:
      A ``(hidden,)`` row in ``weight``'s dtype, on its device.
    """
    real = weight[:num_real].detach().to(device="cpu", dtype=torch.float64)
    mean = real.mean(dim=0)
    std = real.std(dim=0) if num_real > 1 else torch.zeros_like(mean)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64)
    return (mean + std * noise).to(device=weight.device, dtype=weight.dtype)


def add_mask_token(model: HFModel, tokenizer: Any = None, seed: int = 0) -> int:
    """Add the ``<mtp_mask>`` token to a model (and its tokenizer) and return its id.

    The new embedding row is drawn from a normal with the per-dimension mean and standard
    deviation of the existing rows (seeded); an untied un-embedding row gets the same treatment
    and an output bias entry, if any, the mean bias.  When the embedding matrix already has a
    spare padded row beyond the tokenizer (``config.vocab_size > len(tokenizer)``), that row is
    used and nothing is resized.  The id is stored as ``model.config.mtp_mask_token_id``.

    Calling it again is a no-op returning the same id.

    Args:
      model: a transformers causal LM; modified in place.
      tokenizer: its tokenizer, which gets ``<mtp_mask>`` as an additional special token; with
        ``None`` the id is the next row after the embedding matrix (which is grown by one).
      seed: seed of the normal draw.

    Returns:
      The mask token id.

    Raises:
      ValueError: if the tokenizer and the config disagree about an existing mask token id.
    """
    config = model.config
    stored = getattr(config, MASK_TOKEN_CONFIG_KEY, None)
    rows = embedding_rows(model)
    if tokenizer is not None and MASK_TOKEN in tokenizer.get_vocab():
        token_id = int(tokenizer.convert_tokens_to_ids(MASK_TOKEN))
        if stored is not None and int(stored) != token_id:
            raise ValueError(
                f"the tokenizer maps {MASK_TOKEN} to id {token_id} but model.config."
                f"{MASK_TOKEN_CONFIG_KEY} is {stored}; load the tokenizer saved with this model"
            )
        if token_id < rows:
            setattr(config, MASK_TOKEN_CONFIG_KEY, token_id)
            return token_id
        num_real = min(rows, token_id)
    elif stored is not None and 0 <= int(stored) < rows:
        token_id = int(stored)
        if tokenizer is not None:
            _add_to_tokenizer(tokenizer, expected_id=token_id)
        return token_id
    elif tokenizer is not None:
        num_real = min(rows, len(tokenizer))
        token_id = _add_to_tokenizer(tokenizer, expected_id=None)
    else:
        num_real = rows
        token_id = rows

    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        if token_id >= rows:
            model.resize_token_embeddings(token_id + 1, mean_resizing=False)
            _fresh_embedding_parameters(model)
            logger.info("resized the embedding matrix from %d to %d rows", rows, token_id + 1)
        else:
            logger.info("re-using spare embedding row %d for %s (no resize)", token_id, MASK_TOKEN)
        embedding_weight: torch.Tensor = model.get_input_embeddings().weight
        embedding_weight[token_id] = _statistics_init(embedding_weight, num_real, generator)
        output = _untied_output(model)
        if output is not None:
            output_weight: torch.Tensor = output.weight
            output_weight[token_id] = _statistics_init(output_weight, num_real, generator)
            bias = getattr(output, "bias", None)
            if bias is not None:
                bias[token_id] = bias[:num_real].mean()
    setattr(config, MASK_TOKEN_CONFIG_KEY, token_id)
    return token_id


def _fresh_embedding_parameters(model: HFModel) -> None:
    """Give the resized embedding matrices new ``Parameter`` objects (ties kept).

    transformers resizes in place (``weight.data`` swapped under the same ``Parameter``), so a
    parameter that autograd met before the resize (a model trained earlier in the process)
    keeps its old shape in autograd's records and its next backward fails with "invalid
    gradient ... got [V + 1, H] but expected [V, H]".  A new ``Parameter`` has no such record.
    """
    inputs = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is inputs.weight
    inputs.weight = torch.nn.Parameter(
        inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad
    )
    if tied:
        output.weight = inputs.weight
    elif output is not None:
        output.weight = torch.nn.Parameter(
            output.weight.detach().clone(), requires_grad=output.weight.requires_grad
        )


def _add_to_tokenizer(tokenizer: Any, expected_id: int | None) -> int:
    """Add ``<mtp_mask>`` as an additional special token; return its id.

    Raises:
      ValueError: if the tokenizer assigns an id other than ``expected_id``.
    """
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [MASK_TOKEN]}, replace_extra_special_tokens=False
        )
    token_id = int(tokenizer.convert_tokens_to_ids(MASK_TOKEN))
    if expected_id is not None and token_id != expected_id:
        raise ValueError(
            f"model.config.{MASK_TOKEN_CONFIG_KEY} is {expected_id} but adding {MASK_TOKEN} to this "
            f"tokenizer gives id {token_id}; load the tokenizer saved with this model"
        )
    return token_id
