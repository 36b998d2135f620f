"""mtp_core needs only numpy and attrs: no torch, and array-api-compat only when a loss runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_and_decodes_with_only_numpy_and_attrs():
    script = textwrap.dedent(
        """
        import sys
        # Make these packages unimportable: any import of them raises ImportError.
        for name in ("torch", "transformers", "array_api_compat", "safetensors"):
            sys.modules[name] = None
        import numpy as np
        import mtp_core
        from mtp_core import ConfAdapt, decode, training_layout, TrainingLayoutSpec
        from tests.toy_backend import ToyBackend
        result = decode(ToyBackend(), [[0, 1, 2]], ConfAdapt(0.5, 4), mask_token_id=7, max_new_tokens=9)
        assert len(result.tokens[0]) == 9
        layout = training_layout(TrainingLayoutSpec(seq_len=40, k=3, num_regions=4))
        assert layout.attention_mask.shape == (40, 40)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
