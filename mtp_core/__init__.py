"""mtp_core: the pure, typed core of mtp-lm.

Policies, the masking layouts, the student-teacher losses and the decode engine, written against
numpy (and the array API for the losses).  No deep-learning framework is imported here; backends
(``mtp_numpy``, ``mtp_torch`` or third-party ones) execute the plans.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from mtp_core._src.backend import Backend as Backend
from mtp_core._src.backend import Sampling as Sampling
from mtp_core._src.backend import StepInputs as StepInputs
from mtp_core._src.backend import StepOutputs as StepOutputs
from mtp_core._src.engine import DecodeResult as DecodeResult
from mtp_core._src.engine import decode as decode
from mtp_core._src.engine import plan_step as plan_step
from mtp_core._src.policies import AcceptancePolicy as AcceptancePolicy
from mtp_core._src.policies import ConfAdapt as ConfAdapt
from mtp_core._src.policies import StaticK as StaticK
from mtp_core._src.policies import check_confidences as check_confidences
from mtp_core._src.registry import available_backends as available_backends
from mtp_core._src.registry import load_backend as load_backend
from mtp_core._src.registry import register_backend as register_backend

__version__ = "0.1.0"

__all__ = [
    "AcceptancePolicy",
    "Backend",
    "ConfAdapt",
    "DecodeResult",
    "Sampling",
    "StaticK",
    "StepInputs",
    "StepOutputs",
    "available_backends",
    "check_confidences",
    "decode",
    "load_backend",
    "plan_step",
    "register_backend",
]
