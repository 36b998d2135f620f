"""Test-wide settings: deterministic, single-threaded numerics, a bounded hypothesis budget."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs on two xdist workers, and the examples and some tests ask for two threads: two
# OpenMP teams spinning on the same two cores made each run 3-13x slower (mtp_gain.py: 10 s
# alone, 48 s beside a second copy, 134 s inside the suite; passive waiting: 14 s beside one).
# Set before torch loads, and inherited by every subprocess the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
