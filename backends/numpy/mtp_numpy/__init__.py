"""mtp_numpy: the reference numpy backend of mtp-lm.

A Llama-family decoder (Llama, Mistral, Qwen2) written in numpy only, loading transformers
checkpoints from safetensors without any deep-learning framework, and implementing the
``mtp_core.Backend`` protocol so ``mtp_core.decode`` can run multi-token decoding on it.  It is
the oracle the other backends are tested against.

Method: Kirchenbauer et al., "Multi-Token Prediction via Self-Distillation", arXiv 2602.06019.
"""

from mtp_numpy._backend import MASK_TOKEN_CONFIG_KEY as MASK_TOKEN_CONFIG_KEY
from mtp_numpy._backend import NumpyBackend as NumpyBackend
from mtp_numpy._backend import generate as generate
from mtp_numpy._backend import sample_tokens as sample_tokens
from mtp_numpy._llama import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from mtp_numpy._llama import DecoderConfig as DecoderConfig
from mtp_numpy._llama import KVCache as KVCache
from mtp_numpy._llama import LlamaWeights as LlamaWeights
from mtp_numpy._llama import forward_hidden as forward_hidden
from mtp_numpy._llama import forward_logits as forward_logits
from mtp_numpy._llama import load_config as load_config
from mtp_numpy._llama import output_logits as output_logits
from mtp_numpy._safetensors import load_checkpoint_tensors as load_checkpoint_tensors
from mtp_numpy._safetensors import read_safetensors as read_safetensors
from mtp_numpy._safetensors import read_safetensors_header as read_safetensors_header
from mtp_numpy._safetensors import write_safetensors as write_safetensors

__all__ = [
    "MASK_TOKEN_CONFIG_KEY",
    "SUPPORTED_MODEL_TYPES",
    "DecoderConfig",
    "KVCache",
    "LlamaWeights",
    "NumpyBackend",
    "forward_hidden",
    "forward_logits",
    "generate",
    "load_checkpoint_tensors",
    "load_config",
    "output_logits",
    "read_safetensors",
    "read_safetensors_header",
    "sample_tokens",
    "write_safetensors",
]
