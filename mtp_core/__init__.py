"""mtp_core: the pure, typed core of mtp-lm.

Policies, the masking layouts, the student-teacher losses and the decode engine, written against
numpy (and the array API for the losses).  No deep-learning framework is imported here; backends
(``mtp_numpy``, ``mtp_torch`` or third-party ones) execute the plans.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from mtp_core._src.backend import MASK_TOKEN_CONFIG_KEY as MASK_TOKEN_CONFIG_KEY
from mtp_core._src.backend import Backend as Backend
from mtp_core._src.backend import Sampling as Sampling
from mtp_core._src.backend import StepInputs as StepInputs
from mtp_core._src.backend import StepOutputs as StepOutputs
from mtp_core._src.engine import DecodeResult as DecodeResult
from mtp_core._src.engine import StopReason as StopReason
from mtp_core._src.engine import decode as decode
from mtp_core._src.engine import plan_step as plan_step
from mtp_core._src.layout import InferenceLayout as InferenceLayout
from mtp_core._src.layout import TrainingLayout as TrainingLayout
from mtp_core._src.layout import TrainingLayoutSpec as TrainingLayoutSpec
from mtp_core._src.layout import default_num_regions as default_num_regions
from mtp_core._src.layout import inference_layout as inference_layout
from mtp_core._src.layout import student_forcing_pairs as student_forcing_pairs
from mtp_core._src.layout import training_layout as training_layout
from mtp_core._src.losses import LOSS_KINDS as LOSS_KINDS
from mtp_core._src.losses import LossKind as LossKind
from mtp_core._src.losses import agreement as agreement
from mtp_core._src.losses import distillation_loss as distillation_loss
from mtp_core._src.losses import entropy as entropy
from mtp_core._src.losses import ground_truth_loss as ground_truth_loss
from mtp_core._src.losses import hard_teacher_loss as hard_teacher_loss
from mtp_core._src.losses import log_softmax as log_softmax
from mtp_core._src.losses import soft_teacher_loss as soft_teacher_loss
from mtp_core._src.policies import AcceptancePolicy as AcceptancePolicy
from mtp_core._src.policies import ConfAdapt as ConfAdapt
from mtp_core._src.policies import StaticK as StaticK
from mtp_core._src.policies import check_confidences as check_confidences
from mtp_core._src.readout import greedy_tokens as greedy_tokens
from mtp_core._src.readout import read_out as read_out
from mtp_core._src.readout import top1_confidence as top1_confidence
from mtp_core._src.registry import available_backends as available_backends
from mtp_core._src.registry import load_backend as load_backend
from mtp_core._src.registry import register_backend as register_backend
from mtp_core._src.replay import ProposalTable as ProposalTable
from mtp_core._src.replay import ReplayResult as ReplayResult
from mtp_core._src.replay import record_proposals as record_proposals
from mtp_core._src.replay import replay as replay
from mtp_core._src.sampling import draw_tokens as draw_tokens
from mtp_core._src.sampling import filtered_probabilities as filtered_probabilities

__version__ = "0.1.0"

__all__ = [
    "MASK_TOKEN_CONFIG_KEY",
    "LOSS_KINDS",
    "AcceptancePolicy",
    "Backend",
    "ConfAdapt",
    "DecodeResult",
    "InferenceLayout",
    "LossKind",
    "ProposalTable",
    "ReplayResult",
    "Sampling",
    "StaticK",
    "StepInputs",
    "StepOutputs",
    "StopReason",
    "TrainingLayout",
    "TrainingLayoutSpec",
    "agreement",
    "available_backends",
    "check_confidences",
    "decode",
    "default_num_regions",
    "distillation_loss",
    "draw_tokens",
    "entropy",
    "filtered_probabilities",
    "greedy_tokens",
    "ground_truth_loss",
    "hard_teacher_loss",
    "inference_layout",
    "load_backend",
    "log_softmax",
    "plan_step",
    "read_out",
    "record_proposals",
    "register_backend",
    "replay",
    "soft_teacher_loss",
    "student_forcing_pairs",
    "top1_confidence",
    "training_layout",
]
