"""mtp_torch: the PyTorch + transformers backend of mtp-lm.

Wraps any transformers decoder-only causal LM so that it decodes several tokens per forward
pass (``MTPModel``), executes the pure core's decode plans on torch (``TorchBackend``), adds
the single ``<mtp_mask>`` token the method needs (``add_mask_token``) and trains the model by
online self-distillation (``distill`` with a ``DistillConfig``).

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

import importlib
from typing import TYPE_CHECKING, Any

from mtp_core import ConfAdapt as ConfAdapt
from mtp_core import StaticK as StaticK
from mtp_torch.decoding.backend import TorchBackend as TorchBackend
from mtp_torch.decoding.calibrate import auto_plan as auto_plan
from mtp_torch.decoding.gated import MaskGate as MaskGate
from mtp_torch.decoding.gated import add_mask_gate as add_mask_gate
from mtp_torch.decoding.kernels import KernelPlan as KernelPlan
from mtp_torch.decoding.kernels import fixed_plan as fixed_plan
from mtp_torch.decoding.kernels import skinny_linear as skinny_linear
from mtp_torch.decoding.kernels import use_kernels as use_kernels
from mtp_torch.decoding.mask import add_mask_token as add_mask_token
from mtp_torch.decoding.model import GenerateOutput as GenerateOutput
from mtp_torch.decoding.model import MTPModel as MTPModel
from mtp_torch.training.config import DistillConfig as DistillConfig
from mtp_torch.training.distill import distill as distill
from mtp_torch.weights.default import load_default as load_default

__all__ = [
    "BenchConfig",
    "ConfAdapt",
    "CostCurve",
    "DistillConfig",
    "GenerateOutput",
    "KernelPlan",
    "MTPModel",
    "MaskGate",
    "StaticK",
    "TorchBackend",
    "add_mask_gate",
    "add_mask_token",
    "auto_plan",
    "auto_policy",
    "choose_k_max",
    "distill",
    "fixed_plan",
    "load_default",
    "measure_cost_curve",
    "run_benchmark",
    "skinny_linear",
    "speedup_ceiling",
    "use_kernels",
]

if TYPE_CHECKING:
    from mtp_torch.bench.cost import CostCurve as CostCurve
    from mtp_torch.bench.cost import auto_policy as auto_policy
    from mtp_torch.bench.cost import choose_k_max as choose_k_max
    from mtp_torch.bench.cost import measure_cost_curve as measure_cost_curve
    from mtp_torch.bench.cost import speedup_ceiling as speedup_ceiling
    from mtp_torch.bench.runner import BenchConfig as BenchConfig
    from mtp_torch.bench.runner import run_benchmark as run_benchmark

# The benchmark and the cost curve load on first use: `import mtp_torch` stays light (no
# benchmark, no Unix-only `resource`).
_LAZY = {
    "BenchConfig": "mtp_torch.bench.runner",
    "run_benchmark": "mtp_torch.bench.runner",
    "CostCurve": "mtp_torch.bench.cost",
    "auto_policy": "mtp_torch.bench.cost",
    "choose_k_max": "mtp_torch.bench.cost",
    "measure_cost_curve": "mtp_torch.bench.cost",
    "speedup_ceiling": "mtp_torch.bench.cost",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtp_torch' has no attribute {name!r}")
