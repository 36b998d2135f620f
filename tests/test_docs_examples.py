"""The documentation: API coverage, the runnable examples, and the Sphinx build with -W.

Each example runs end to end in a subprocess (tiny models, CPU, no network), as a user would run
it; the examples assert their own claims (e.g. ``verify=True`` equals greedy decoding), so a
non-zero exit status is a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"


def _load_checker() -> ModuleType:
    path = DOCS / "check_api_coverage.py"
    spec = importlib.util.spec_from_file_location("check_api_coverage", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- API coverage --------------------------------------------------------------------------------


def test_every_public_name_is_documented() -> None:
    result = _run([str(DOCS / "check_api_coverage.py")], timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "API documentation complete" in result.stdout


def test_checker_reports_missing_names_and_parses_both_syntaxes(tmp_path: Path) -> None:
    checker = _load_checker()
    (tmp_path / "a.rst").write_text(
        ".. autoclass:: mtp_core.ConfAdapt\n   :members:\n\n.. py:data:: mtp_core.LossKind\n",
        encoding="utf-8",
    )
    (tmp_path / "b.md").write_text(
        "```{autofunction} mtp_core.decode\n```\n\n:::{autoclass} mtp_core.StaticK\n:::\n",
        encoding="utf-8",
    )
    documented = checker.documented_names(tmp_path)
    assert documented == {
        "mtp_core.ConfAdapt": "autoclass",
        "mtp_core.LossKind": "py:data",
        "mtp_core.decode": "autofunction",
        "mtp_core.StaticK": "autoclass",
    }
    import mtp_core

    problems = checker.check_package("mtp_core", documented)
    missing = {line.split(":")[0] for line in problems}
    expected = {f"mtp_core.{name}" for name in mtp_core.__all__} - set(documented)
    assert missing == expected


def test_checker_flags_undocumented_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    checker = _load_checker()
    package = ModuleType("fake_pkg")

    def documented_function() -> None:
        """Has a docstring."""

    def bare_function() -> None:
        pass

    class BareMethods:
        """A class whose public method has no docstring."""

        def method(self) -> None:
            pass

    package.__all__ = ["documented_function", "bare_function", "BareMethods", "CONSTANT"]  # type: ignore[attr-defined]
    package.documented_function = documented_function  # type: ignore[attr-defined]
    package.bare_function = bare_function  # type: ignore[attr-defined]
    package.BareMethods = BareMethods  # type: ignore[attr-defined]
    package.CONSTANT = "value"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_pkg", package)
    documented = {f"fake_pkg.{name}": "autofunction" for name in package.__all__}  # type: ignore[attr-defined]
    documented["fake_pkg.CONSTANT"] = "py:data"
    problems = checker.check_package("fake_pkg", documented)
    assert any(p.startswith("fake_pkg.bare_function: no docstring") for p in problems)
    assert any(p.startswith("fake_pkg.BareMethods.method: no docstring") for p in problems)
    assert not any("documented_function" in p or "CONSTANT" in p for p in problems)
    assert len(problems) == 2


# --- examples ------------------------------------------------------------------------------------

EXAMPLE_FILES = sorted(path.name for path in EXAMPLES.glob("*.py"))
EXPECTED_OUTPUT = {
    "quickstart_decode.py": "verify=True equals greedy generate",
    "custom_backend.py": "verify=True equals greedy",
    "threshold_sweep.py": "tokens/forward",
    "convert_tiny_model.py": "saved to and restored from",
    "benchmark_tiny.py": "methods benchmarked",
    "gpu_convert_default.py": "delta written: True",
    "gpu_check.py": "gpu check passed: True",
    "kernel_cost.py": "greedy tokens with every kernel: True",
    "mtp_gain.py": "StaticK(1)'s output with every policy: True",
    "pass_widths.py": "pass widths timed: True",
    "product_stream.py": "products timed: True",
    "replay_policies.py": "replayed verification is the decode (tokens and passes): True",
}


def test_examples_are_the_expected_ones() -> None:
    assert set(EXAMPLE_FILES) == set(EXPECTED_OUTPUT)


# Each example takes 1-12 s on an idle CPU core (the conversion is the longest), so none is
# marked slow; the generous timeout only guards against a hang on a busy machine.  mtp_gain.py
# and replay_policies.py decode with the embedded default (~40 s warm); on a fresh machine it may also convert the
# GGUF and build the compiled extension first, while other tests compete for the cores.
TIMEOUTS = {"mtp_gain.py": 900, "replay_policies.py": 900}


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_runs(name: str) -> None:
    result = _run([str(EXAMPLES / name)], timeout=TIMEOUTS.get(name, 300))
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert EXPECTED_OUTPUT[name] in result.stdout


def test_pass_widths_times_packed_weights_with_the_same_results() -> None:
    """``pass_widths.py --packed``: the tiny model rounded to Q4_1 codes packs, and both
    backends give the same tokens and confidences at every width."""
    result = _run([str(EXAMPLES / "pass_widths.py"), "--packed", "--iterations", "2"], timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "packed weights: one-token pass" in result.stdout
    assert "no weight of this model packs" not in result.stdout
    assert "(same tokens and confidences: True)" in result.stdout


def test_the_product_stream_reads_packed_weights_with_the_same_bits() -> None:
    result = _run([str(EXAMPLES / "product_stream.py"), "--packed", "--repeats", "1"], timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "packed: t(1)" in result.stdout
    assert "packed products equal the float32 ones bit for bit: True" in result.stdout


def test_judging_a_checkpoint_logs_each_subset_and_the_whole(tmp_path: Path) -> None:
    """``replay_policies.py --judge``: one JSON line per subset and one over all prompts, named
    by the prompt file and absolute index, the whole a weighted mean of its parts."""
    log = tmp_path / "evals.jsonl"
    args = ["--num", "2", "--new-tokens", "8", "--threads", "1", "--judge", "smoke"]
    result = _run(
        [str(EXAMPLES / "replay_policies.py"), *args, "--subsets", "0:1,1:2", "--log", str(log)],
        timeout=TIMEOUTS["replay_policies.py"],
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert [line["prompts"] for line in lines] == [
        "bench_prompts[0:1]",
        "bench_prompts[1:2]",
        "bench_prompts[0:2]",
    ]
    assert {line["checkpoint"] for line in lines} == {"smoke"}
    for key in ("confadapt_0.9_k4", "verify_static_3"):
        parts = sorted(line[key] for line in lines[:2])
        assert 1.0 <= parts[0] <= lines[2][key] <= parts[1] <= 4.0
    bad = _run([str(EXAMPLES / "replay_policies.py"), "--num", "2", "--judge", "x",
                "--subsets", "0:3"], timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "must lie within the 2 recorded prompts" in bad.stderr


def test_gpu_conversion_stops_at_its_deadline_and_still_writes_the_delta() -> None:
    """``--stop-after``: the script's own SIGTERM ends a run set to far more steps than it can
    take, after the step in flight, and the delta is written all the same."""
    result = _run(
        [str(EXAMPLES / "gpu_convert_default.py"), "--steps", "1000000", "--stop-after", "20"],
        timeout=300,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "SIGTERM: stopping after this step" in result.stdout
    summary = json.loads(next(line for line in result.stdout.splitlines() if '"step"' in line))
    assert 0 < summary["step"] < 1000000
    assert "delta written: True" in result.stdout


def test_the_gpu_lease_scripts_parse_and_are_documented() -> None:
    """The lease scripts run only on a lent GPU: here they must at least parse, and the README
    that says which call runs which must name every one of them."""
    folder = EXAMPLES / "gpu_lease"
    scripts = sorted(folder.glob("*.sh"))
    assert {path.name for path in scripts} == {"prepare.sh", "stage.sh", "preflight.sh", "job.sh"}
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for path in scripts:
        parsed = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert parsed.returncode == 0, parsed.stderr
        assert f"examples/gpu_lease/{path.name}" in readme, path.name


def test_every_example_is_included_in_the_docs() -> None:
    pages = "\n".join(
        path.read_text(encoding="utf-8")
        for path in [*DOCS.rglob("*.md"), *DOCS.rglob("*.rst")]
        if "_build" not in path.parts
    )
    included = set(re.findall(r"literalinclude\}?\s+\S*examples/([\w.]+\.py)", pages))
    assert included == set(EXAMPLE_FILES)


# --- the Sphinx build -----------------------------------------------------------------------------


def test_docs_build_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    result = _run(
        ["-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index", "concepts", "results", "api/mtp_core", "api/mtp_numpy", "api/mtp_torch"):
        assert (tmp_path / f"{page}.html").is_file()
