"""mtp_torch: the PyTorch + transformers backend of mtp-lm.

Wraps any transformers decoder-only causal LM so that it decodes several tokens per forward
pass (``MTPModel``), executes the pure core's decode plans on torch (``TorchBackend``), adds
the single ``<mtp_mask>`` token the method needs (``add_mask_token``) and trains the model by
online self-distillation (``distill`` with a ``DistillConfig``).

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from mtp_core import ConfAdapt as ConfAdapt
from mtp_core import StaticK as StaticK
from mtp_torch._backend import TorchBackend as TorchBackend
from mtp_torch._default import load_default as load_default
from mtp_torch._distill import DistillConfig as DistillConfig
from mtp_torch._distill import distill as distill
from mtp_torch._mask import add_mask_token as add_mask_token
from mtp_torch._model import GenerateOutput as GenerateOutput
from mtp_torch._model import MTPModel as MTPModel

__all__ = [
    "ConfAdapt",
    "DistillConfig",
    "GenerateOutput",
    "MTPModel",
    "StaticK",
    "TorchBackend",
    "add_mask_token",
    "distill",
    "load_default",
]
