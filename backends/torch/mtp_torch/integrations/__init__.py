"""Adapters that let other tools drive ``MTPModel``.

Each adapter lives in its own module and imports its tool only when that module is imported, so
``import mtp_torch`` (and this package) never loads them:

- ``mtp_torch.integrations.lm_eval``: the lm-evaluation-harness model ``"mtp"`` (extra
  ``lm-eval``: ``pip install "mtp-lm[torch,lm-eval]"``).
"""
