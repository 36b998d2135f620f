"""Developer sessions: ``nox -s lint typecheck tests docs examples build``.

Every session installs from this repository's files with the pinned versions in
``constraints.txt`` (the CPU build of torch), so a session behaves the same on any machine.
"""

from __future__ import annotations

import glob

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "docs", "examples"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints.txt")


def _install(session: nox.Session, extras: str = "torch,dev") -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff over the whole tree."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", "mtp_core", "backends", "tests", "examples", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the pure core (numpy + attrs only), and the typed backends."""
    _install(session)
    session.run("mypy", "--strict", "mtp_core")
    session.run("mypy", "backends/numpy/mtp_numpy", "backends/torch/mtp_torch", "--ignore-missing-imports")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (the README's test command)."""
    _install(session)
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Sphinx with warnings as errors; fails on any undocumented public name."""
    _install(session)
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every example script end to end (tiny models, CPU)."""
    _install(session)
    for script in sorted(glob.glob("examples/*.py")):
        session.run("python", script)


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build the sdist and wheel."""
    session.install("build")
    session.run("python", "-m", "build")


@nox.session(python=PYTHON)
def gpu_check(session: nox.Session) -> None:
    """The GPU check (docs/guides/gpu_check.md): pass ``-- --device cuda`` on a CUDA machine."""
    _install(session)
    session.run("python", "examples/gpu_check.py", *session.posargs)
