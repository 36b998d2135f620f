"""The walk-throughs of docs/contributing.md ("Where a change goes"), followed step by step.

Each test does what its walk-through says, in its order: a new backend is a class of its own
registered by name; a new loss, acceptance policy or benchmark method is a set of edits to this
repository, applied here to a scratch copy of the packages (the edit's anchor must still be in
the file the walk-through names, or the test says which step no longer matches), and a fresh
interpreter on that copy checks that the new thing is used: it decodes, trains one step, or
shows up in a benchmark run.  When a step of the walk-through changes, the test changes with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import mtp_core
from mtp_core import ConfAdapt, Sampling, StaticK, StepInputs, StepOutputs
from mtp_torch.decoding.model import MTPModel
from tests.synthetic import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TORCH_PACKAGE = "backends/torch/mtp_torch"


# --- a new backend: a class with the five methods, registered by name --------------------------

Slots = list[list[tuple[int, int]]]  # per row, the (position, token) of every cache slot


class NoCacheBackend:
    """Step 1: the five methods of ``mtp_core.Backend``, here over a transformers model run
    without a cache: every read position's output comes from the model run on the whole
    context that position may see (the reference the backend guide names)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def new_cache(self, batch_size: int) -> Slots:
        return [[] for _ in range(batch_size)]

    def cache_length(self, cache: Slots) -> int:
        return len(cache[0]) if cache else 0

    def forward(
        self, cache: Slots, inputs: StepInputs, sampling: Sampling, seed: int
    ) -> tuple[StepOutputs, Slots]:
        past = self.cache_length(cache)
        rows: list[list[np.ndarray]] = []
        for row, slots in enumerate(cache):
            positions, tokens = inputs.position_ids[row].tolist(), inputs.token_ids[row].tolist()
            slots.extend(zip(positions, tokens, strict=True))
            rows.append([])
            for index in inputs.read_index[row].tolist():
                query = past + index
                seen = [slots[s] for s in range(query + 1) if inputs.attention_mask[row, s]]
                seen_positions, seen_tokens = zip(*seen, strict=True)
                with torch.no_grad():
                    logits = self.model(
                        input_ids=torch.tensor([seen_tokens]),
                        position_ids=torch.tensor([seen_positions]),
                    ).logits
                rows[-1].append(logits[0, -1].double().numpy())
        logits = np.asarray(rows)
        # The read-out, by the core's rules (one uniform per position when sampling).
        uniforms = (
            None if sampling.greedy else np.random.default_rng(seed).random(logits.shape[:-1])
        )
        tokens, confidences = mtp_core.read_out(logits, sampling, uniforms)
        return StepOutputs(np.asarray(tokens, dtype=np.int64), confidences), cache

    def crop(self, cache: Slots, length: int) -> Slots:
        return [slots[:length] for slots in cache]

    def reindex(self, cache: Slots, rows: np.ndarray, slots: np.ndarray | None) -> Slots:
        kept = [cache[int(r)] for r in rows]
        if slots is None:
            return [list(row) for row in kept]
        return [[row[int(s)] for s in picks] for row, picks in zip(kept, slots, strict=True)]


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 1, 5, 7, 9, 2], [3, 4, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_walkthrough_new_backend() -> None:
    model = tiny_llama(40, hidden_size=32, dtype=torch.float64, seed=1, initializer_range=0.2)
    built_in = MTPModel(model)
    # Step 2: register it under a name (a package would use the entry point).
    mtp_core.register_backend("nocache", f"{__name__}:NoCacheBackend")
    assert "nocache" in mtp_core.available_backends()
    # Step 3: decode on it, through the engine and through MTPModel.
    mine = MTPModel(model, backend="nocache")
    assert isinstance(mine.decoding_backend(), NoCacheBackend)
    ids, mask = _prompts()
    for policy, verify in ((StaticK(1), False), (ConfAdapt(0.1, 4), False), (StaticK(3), True)):
        settings = dict(max_new_tokens=10, attention_mask=mask, eos_token_id=[], verify=verify)
        expected = built_in.generate(ids, policy, **settings)
        got = mine.generate(ids, policy, **settings)
        assert torch.equal(got.sequences, expected.sequences)
        assert got.num_forward_passes == expected.num_forward_passes
    assert max(np.flatnonzero(got.accepted_histogram)) > 1  # several tokens per pass
    direct = mtp_core.decode(
        NoCacheBackend(model), [[1, 5, 7, 9, 2]], StaticK(2), mask_token_id=mine.mask_token_id,
        max_new_tokens=6,
    )  # fmt: skip
    assert len(direct.tokens[0]) == 6


def test_an_unregistered_or_unfit_backend_name_says_what_to_do() -> None:
    model = tiny_llama(40, hidden_size=16)
    with pytest.raises(ValueError, match="registered: .*numpy.*torch"):
        MTPModel(model, backend="no-such-backend")
    numpy_named = MTPModel(model, backend="numpy")  # registered, but built from a checkpoint
    with pytest.raises(TypeError, match="cannot be built from a transformers model"):
        numpy_named.generate(torch.tensor([[1, 2, 3]]), StaticK(1), max_new_tokens=2)
    torch_named = MTPModel(model, backend="torch")
    assert type(torch_named.decoding_backend()).__name__ == "TorchBackend"


# --- the walk-throughs that edit the repository: a scratch copy --------------------------------


class Scratch:
    """A copy of some of the repository's folders, edited as a walk-through says, and a fresh
    interpreter that imports the copy first (the rest from this checkout)."""

    def __init__(self, root: Path, *folders: str) -> None:
        self.root = root
        ignore = shutil.ignore_patterns("__pycache__", "*.safetensors", "_build", "logs")
        for folder in folders:
            shutil.copytree(ROOT / folder, root / folder, ignore=ignore)

    def edit(self, step: str, relative: str, old: str, new: str) -> None:
        """Replace the one ``old`` in ``relative`` by ``new`` (``step`` names the step)."""
        path = self.root / relative
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, (
            f"{step}: {relative} no longer holds {old.strip()[:80]!r} once; update the "
            "walk-through in docs/contributing.md and this test together"
        )
        path.write_text(text.replace(old, new), encoding="utf-8")

    def append(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")

    def run(self, code: str, *args: str) -> dict[str, Any]:
        """Run ``code`` in a fresh interpreter; its last line of output, read as JSON."""
        paths = [self.root / "backends" / "torch", self.root / "backends" / "numpy", self.root]
        paths += [ROOT, ROOT / "backends" / "numpy", ROOT / "backends" / "torch"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths if p.is_dir())
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            cwd=self.root, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))


POLICY_CLASS = '''

@attrs.frozen
class MeanConfidence:
    """Keep all ``k_max`` proposals when their mean confidence reaches ``threshold``, else one."""

    threshold: float = attrs.field(validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    k_max: int = attrs.field(validator=attrs.validators.ge(1))

    @property
    def num_positions(self) -> int:
        """``k_max``: one real position and ``k_max - 1`` masks."""
        return int(self.k_max)

    def accept(self, confidences: npt.ArrayLike) -> IntArray:
        """``k_max`` per row whose mean confidence is at least ``threshold``, else 1."""
        array = check_confidences(confidences)
        kept: IntArray = np.where(array.mean(axis=1) >= self.threshold, self.k_max, 1)
        return kept.astype(np.int64)
'''

POLICY_CHECK = """
import json, subprocess, sys, tempfile
import torch
from mtp_core import MeanConfidence, StaticK
from mtp_torch import MTPModel
from mtp_torch.bench.methods import policy_label
from mtp_torch.decoding.policies import parse_policy
from tests.synthetic import tiny_llama

policy = parse_policy("mean:0.1:3")
mtp = MTPModel(tiny_llama(40, hidden_size=32, seed=1, initializer_range=0.2, dtype=torch.float64))
ids = torch.tensor([[1, 5, 7, 9, 2]])
run = dict(max_new_tokens=16, eos_token_id=[])
fast = mtp.generate(ids, policy, **run)
greedy = mtp.generate(ids, StaticK(1), **run)
lossless = mtp.generate(ids, policy, verify=True, **run)
mtp.default_policy = policy
with tempfile.TemporaryDirectory() as directory:
    mtp.save_pretrained(directory + "/model")
    restored = MTPModel.from_pretrained(directory + "/model").default_policy
coverage = subprocess.run([sys.executable, "docs/check_api_coverage.py", "mtp_core"],
                          capture_output=True, text=True)
print(json.dumps({
    "parsed": policy == MeanConfidence(0.1, 3),
    "histogram": [int(c) for c in fast.accepted_histogram],
    "lossless_is_greedy": bool(torch.equal(lossless.sequences, greedy.sequences)),
    "restored": restored == policy,
    "label": policy_label(policy),
    "coverage": coverage.returncode, "coverage_text": coverage.stdout + coverage.stderr,
}))
"""


def test_walkthrough_new_acceptance_policy(tmp_path: Path) -> None:
    repo = Scratch(tmp_path, "mtp_core", TORCH_PACKAGE, "docs/api")
    shutil.copy(ROOT / "docs" / "check_api_coverage.py", tmp_path / "docs")
    # 1. A frozen attrs class in mtp_core/_src/policies.py satisfying AcceptancePolicy.
    repo.append("mtp_core/_src/policies.py", POLICY_CLASS)
    # 2. Export it from mtp_core/__init__.py and document it in docs/api/mtp_core.rst.
    repo.edit(
        "2", "mtp_core/__init__.py",
        "from mtp_core._src.policies import ConfAdapt as ConfAdapt\n",
        "from mtp_core._src.policies import ConfAdapt as ConfAdapt\n"
        "from mtp_core._src.policies import MeanConfidence as MeanConfidence\n",
    )  # fmt: skip
    repo.edit(
        "2", "mtp_core/__init__.py", '    "LossKind",\n', '    "LossKind",\n    "MeanConfidence",\n'
    )
    repo.edit(
        "2", "docs/api/mtp_core.rst",
        ".. autofunction:: mtp_core.check_confidences\n",
        ".. autoclass:: mtp_core.MeanConfidence\n   :members: num_positions, accept\n\n"
        ".. autofunction:: mtp_core.check_confidences\n",
    )  # fmt: skip
    # 3. A branch in decoding/policies.py parse_policy, and its inverse in policy_spec.
    policies = f"{TORCH_PACKAGE}/decoding/policies.py"
    repo.edit(
        "3", policies, "from mtp_core import AcceptancePolicy, ConfAdapt, StaticK\n",
        "from mtp_core import AcceptancePolicy, ConfAdapt, MeanConfidence, StaticK\n",
    )  # fmt: skip
    repo.edit(
        "3", policies,
        "            return StaticK(int(fields[0]))\n",
        "            return StaticK(int(fields[0]))\n"
        '        if name == "mean" and len(fields) == 2:\n'
        "            return MeanConfidence(float(fields[0]), int(fields[1]))\n",
    )  # fmt: skip
    repo.edit(
        "3", policies,
        '        spec = f"static:{int(policy.k)}"\n',
        '        spec = f"static:{int(policy.k)}"\n'
        "    elif type(policy) is MeanConfidence:\n"
        '        spec = f"mean:{float(policy.threshold)!r}:{int(policy.k_max)}"\n',
    )  # fmt: skip
    # 4. A readable benchmark row: bench/methods.py policy_label.
    methods = f"{TORCH_PACKAGE}/bench/methods.py"
    repo.edit(
        "4", methods, "from mtp_core import AcceptancePolicy, ConfAdapt, StaticK\n",
        "from mtp_core import AcceptancePolicy, ConfAdapt, MeanConfidence, StaticK\n",
    )  # fmt: skip
    repo.edit(
        "4", methods,
        '        return f"StaticK({policy.k})"\n',
        '        return f"StaticK({policy.k})"\n'
        "    if isinstance(policy, MeanConfidence):\n"
        '        return f"MeanConfidence({policy.threshold:g}, {policy.k_max})"\n',
    )  # fmt: skip
    found = repo.run(POLICY_CHECK)
    assert found["parsed"] and found["restored"] and found["lossless_is_greedy"]
    assert found["histogram"][1] > 0 and found["histogram"][3] > 0, found["histogram"]
    assert found["label"] == "MeanConfidence(0.1, 3)"
    assert found["coverage"] == 0, found["coverage_text"]


LOSS_FUNCTION = '''

def brier_loss(
    student_logits: ArrayT, teacher_logits: Array, weights: Array | None = None
) -> ArrayT:
    """Squared distance between the student's and the teacher's softmax at each position."""
    xp = array_namespace(student_logits)
    _check_pair(student_logits, teacher_logits)
    gap = xp.exp(log_softmax(student_logits)) - xp.exp(log_softmax(teacher_logits))
    values = xp.sum(gap * gap, axis=-1)
    result: ArrayT = _weighted_mean(xp, values, _position_weights(xp, student_logits, weights))
    return result
'''

LOSS_CHECK = """
import argparse, copy, json
import numpy as np
import torch
from mtp_core import LOSS_KINDS, distillation_loss
from mtp_torch.cli.convert import TRAINING_OPTIONS, add_arguments
from mtp_torch.cli.options import config_overrides
from mtp_torch.training.config import DistillConfig
from mtp_torch.training.distill import distill
from tests.synthetic import make_language, tiny_llama

logits = np.random.default_rng(0).standard_normal((2, 3, 4, 9))
parser = argparse.ArgumentParser()
add_arguments(parser)
chosen = config_overrides(parser.parse_args(["--loss", "brier"]), TRAINING_OPTIONS)["loss"]
cfg = DistillConfig(loss=chosen, k_max=3, steps=2, seq_len=24, batch_size=2, lr=1e-2,
                    progress=False, device="cpu")
model = tiny_llama(32, hidden_size=16)
before = copy.deepcopy(model.model.layers[0].mlp.up_proj.weight)
logged = []
trained = distill(model, make_language(32).documents(20, 30), cfg, on_step=logged.append)
print(json.dumps({
    "kinds": list(LOSS_KINDS),
    "zero": float(distillation_loss(logits, logits, kind="brier")),
    "apart": float(distillation_loss(logits, logits[::-1], kind="brier")),
    "needs_teacher": cfg.needs_teacher,
    "losses": [step.loss for step in logged],
    "moved": not torch.equal(before, trained.model.model.layers[0].mlp.up_proj.weight),
}))
"""


def test_walkthrough_new_loss(tmp_path: Path) -> None:
    repo = Scratch(tmp_path, "mtp_core")
    losses = "mtp_core/_src/losses.py"
    # 1. One function in mtp_core/_src/losses.py, against the array namespace.
    repo.append(losses, LOSS_FUNCTION)
    # 2. Its name in LossKind (LOSS_KINDS follows).
    repo.edit(
        "2", losses, 'LossKind = Literal["hard", "soft", "gt"]',
        'LossKind = Literal["hard", "soft", "gt", "brier"]',
    )  # fmt: skip
    # 3. Its branch in distillation_loss.
    repo.edit(
        "3", losses,
        '        if kind == "hard":\n',
        '        if kind == "brier":\n'
        "            loss = brier_loss(student_logits, teacher_logits, weights)\n"
        '        elif kind == "hard":\n',
    )  # fmt: skip
    # Then DistillConfig and mtp convert --loss accept it, and a step trains with it.
    found = repo.run(LOSS_CHECK)
    assert found["kinds"] == ["hard", "soft", "gt", "brier"]
    assert found["zero"] == 0.0 and found["apart"] > 0.0
    assert found["needs_teacher"] and found["moved"]
    assert len(found["losses"]) == 2 and all(np.isfinite(found["losses"]))


BENCH_METHOD = '''

@attrs.frozen
class SampledStaticK:
    """MTP decoding keeping all ``k`` proposals, each token sampled at temperature 0.7."""

    k: int
    precision: str = "base"

    @property
    def name(self) -> str:
        """``sampled_static_{k}``."""
        return f"sampled_static_{self.k}{_suffix(self.precision)}"

    def describe(self) -> MethodInfo:
        """The report fields."""
        return MethodInfo(name=self.name, family="static", policy=StaticK(self.k), k_max=self.k)

    def generate(
        self, models: ModelsUnderTest, input_ids: torch.Tensor, settings: RunSettings
    ) -> Generated:
        """Decode with ``MTPModel.generate`` at temperature 0.7 (seed 0)."""
        out = models.mtp_model.generate(
            input_ids,
            policy=StaticK(self.k),
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=settings.eos_argument(),
            temperature=0.7,
            seed=0,
        )
        histogram = tuple(int(count) for count in np.asarray(out.accepted_histogram).ravel())
        return Generated(out.sequences, histogram)
'''

BENCH_CHECK = """
import json, sys
from pathlib import Path
from mtp_torch import MTPModel
from mtp_torch.cli.bench import main
from tests.synthetic import make_tokenizer, tiny_llama

tokenizer = make_tokenizer()
model = tiny_llama(len(tokenizer), hidden_size=32, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
path = MTPModel(model, tokenizer=tokenizer).save_pretrained("model")
Path("prompts.jsonl").write_text('{"prompt": "what is two plus three"}\\n', encoding="utf-8")
status = main([
    "--model", str(path), "--data", "prompts.jsonl", "--out", "report.json", "--no-plot",
    "--num-prompts", "1", "--max-new-tokens", "6", "--k-max", "", "--thresholds", "",
    "--static", "", "--verify-thresholds", "", "--verify-static", "", "--repeats", "1",
    "--prompt-lookup-tokens", "0", "--no-cost-curve", "--kernel", "stock", "--quiet",
    "--sampled-static", "2",
])
rows = json.loads(Path("report.json").read_text(encoding="utf-8"))["methods"]
print(json.dumps({"status": status, "rows": {row["name"]: row["generated_tokens"] for row in rows}}))
"""


def test_walkthrough_new_benchmark_method(tmp_path: Path) -> None:
    repo = Scratch(tmp_path, TORCH_PACKAGE)
    methods = f"{TORCH_PACKAGE}/bench/methods.py"
    # 1. A small frozen attrs class in bench/methods.py implementing BenchMethod.
    repo.append(methods, BENCH_METHOD)
    # 2. A parameter of bench_methods and a line that adds the method.
    repo.edit(
        "2", methods,
        "    verify_static: Sequence[int] = (),\n",
        "    verify_static: Sequence[int] = (),\n    sampled_static: Sequence[int] = (),\n",
    )  # fmt: skip
    repo.edit(
        "2", methods,
        "    methods += [VerifyStaticDecoding(int(k), precision) for k in verify_static]\n",
        "    methods += [VerifyStaticDecoding(int(k), precision) for k in verify_static]\n"
        "    methods += [SampledStaticK(int(k), precision) for k in sampled_static]\n",
    )  # fmt: skip
    # 3. A field of BenchConfig, passed to bench_methods in the runner's _models_and_methods,
    #    and an mtp bench option (_add_method_arguments, and run, which builds the config).
    repo.edit(
        "3", f"{TORCH_PACKAGE}/bench/config.py",
        "    verify_static: tuple[int, ...] = attrs.field(default=(), converter=int_tuple)\n",
        "    verify_static: tuple[int, ...] = attrs.field(default=(), converter=int_tuple)\n"
        "    sampled_static: tuple[int, ...] = attrs.field(default=(), converter=int_tuple)\n",
    )  # fmt: skip
    repo.edit(
        "3", f"{TORCH_PACKAGE}/bench/runner.py",
        '            verify_static=config.verify_static if precision != "int8" else (),\n',
        '            verify_static=config.verify_static if precision != "int8" else (),\n'
        "            sampled_static=config.sampled_static,\n",
    )  # fmt: skip
    cli = f"{TORCH_PACKAGE}/cli/bench.py"
    repo.edit(
        "3", cli,
        "        \"verify (verify_static_{k}; comma-separated, '' for none)\",\n    )\n",
        "        \"verify (verify_static_{k}; comma-separated, '' for none)\",\n    )\n"
        "    parser.add_argument(\n"
        '        "--sampled-static", type=_int_list, default=defaults.sampled_static,\n'
        '        help="k values of static-k rows that sample at temperature 0.7",\n'
        "    )\n",
    )  # fmt: skip
    repo.edit(
        "3", cli,
        '        verify_static=methods["verify_static"],\n',
        '        verify_static=methods["verify_static"],\n'
        "        sampled_static=args.sampled_static,\n",
    )  # fmt: skip
    found = repo.run(BENCH_CHECK)  # writes its model, prompts and report beside the copy
    assert found["status"] == 0
    assert set(found["rows"]) == {"greedy", "static_1", "sampled_static_2"}
    assert found["rows"]["sampled_static_2"] > 0
