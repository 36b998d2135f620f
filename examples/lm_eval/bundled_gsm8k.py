"""Data of the task ``gsm8k_cot_bundled`` (``gsm8k_cot_bundled.yaml`` beside this file).

The harness's ``gsm8k_cot`` reads GSM8K from the Hugging Face Hub; this task reads the 256
GSM8K test rows (1000-1255) that ship inside ``mtp_torch`` instead, so it runs offline.  Its
prompt format, stop strings, answer filters and metric are those of ``gsm8k_cot``; the eight
chain-of-thought exemplars are read from the harness's own ``gsm8k-cot.yaml``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import datasets
import yaml


def load_rows(**_: Any) -> datasets.DatasetDict:
    """The bundled GSM8K test rows as the split ``test`` (``question``, ``answer``, ``source``).

    The harness passes the model arguments and the task metadata as keywords; they are unused.
    """
    text = (resources.files("mtp_torch") / "data" / "bench_prompts.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    gsm8k = [row for row in rows if str(row.get("source", "")).startswith("gsm8k")]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(gsm8k)})


def cot_exemplars() -> list[dict[str, str]]:
    """The eight few-shot exemplars of the harness's ``gsm8k_cot`` (``question``, ``target``)."""
    harness_task = resources.files("lm_eval.tasks") / "gsm8k" / "gsm8k-cot.yaml"
    config = yaml.safe_load(harness_task.read_text("utf-8"))
    return list(config["fewshot_config"]["samples"])
