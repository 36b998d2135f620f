"""The core and the numpy backend run a whole decode without importing torch or transformers.

The checkpoint is written with ``mtp_numpy.write_safetensors`` (numpy only), and the check runs
in a fresh interpreter so that nothing this test session imported can leak into it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mtp_numpy import write_safetensors

VOCAB = 50
MASK = 49

_CHILD = """
import json, sys
import numpy as np
import mtp_core
import mtp_numpy

path = sys.argv[1]
backend_class = mtp_core.load_backend("numpy")
backend = backend_class.from_pretrained(path)
result = mtp_core.decode(
    backend, [[1, 2, 3], [4]], mtp_core.ConfAdapt(0.5, 3),
    mask_token_id=backend.mask_token_id, max_new_tokens=6, verify=True,
)
via_generate = mtp_numpy.generate(path, [[1, 2, 3], [4]], mtp_core.StaticK(1), max_new_tokens=6)
heavy = sorted(name for name in ("torch", "transformers", "safetensors") if name in sys.modules)
print(json.dumps({
    "tokens": [row.tolist() for row in result.tokens],
    "greedy": [row.tolist() for row in via_generate.tokens],
    "heavy": heavy,
}))
"""


def _write_tiny_llama(directory: Path) -> None:
    """A random 2-layer Llama checkpoint in the transformers layout, float32 safetensors."""
    rng = np.random.default_rng(0)
    hidden, inner, heads, kv_heads, layers = 16, 32, 4, 2, 2
    head_dim = hidden // heads

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(VOCAB, hidden)}
    for index in range(layers):
        prefix = f"model.layers.{index}"
        tensors.update(
            {
                f"{prefix}.input_layernorm.weight": 1 + normal(hidden),
                f"{prefix}.self_attn.q_proj.weight": normal(heads * head_dim, hidden),
                f"{prefix}.self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
                f"{prefix}.self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
                f"{prefix}.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
                f"{prefix}.post_attention_layernorm.weight": 1 + normal(hidden),
                f"{prefix}.mlp.gate_proj.weight": normal(inner, hidden),
                f"{prefix}.mlp.up_proj.weight": normal(inner, hidden),
                f"{prefix}.mlp.down_proj.weight": normal(hidden, inner),
            }
        )
    tensors["model.norm.weight"] = 1 + normal(hidden)
    config = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": None,
        "mtp_mask_token_id": MASK,
    }
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))


def test_decode_without_torch(tmp_path: Path) -> None:
    checkpoint = tmp_path / "tiny"
    _write_tiny_llama(checkpoint)
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], f"imported without need: {report['heavy']}"
    # verify=True reproduces greedy decoding; both rows decode their full budget (no stop id).
    assert report["tokens"] == report["greedy"]
    assert [len(row) for row in report["tokens"]] == [6, 6]
    assert all(0 <= token < VOCAB for row in report["tokens"] for token in row)
