"""Check that the API reference documents every public name, and that each has a docstring.

For each package below, every name in its ``__all__`` must

1. appear in a documenting directive of a page under ``docs/api/`` (``.. autoclass::``,
   ``.. autofunction::``, ``.. autodata::``, ``.. py:data::`` ... in ``.rst`` pages, or the MyST
   forms ```` ```{autoclass} ```` / ``:::{autofunction}`` in ``.md`` pages), spelled with the
   package prefix (``mtp_core.ConfAdapt``);
2. have a docstring of its own when it is a class or a function (and so must every public
   method and property a class defines).  Constants cannot carry a docstring at run time, so
   they must be documented with ``.. py:data::`` (text on the page) or ``.. autodata::`` with
   a ``#:`` comment or a string literal after the assignment in the source.

Usage::

    python docs/check_api_coverage.py            # all packages
    python docs/check_api_coverage.py mtp_core   # some of them

Exits 0 when everything is covered, 1 otherwise, listing each problem (with ``file:line`` for
missing docstrings).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGES: tuple[str, ...] = ("mtp_core", "mtp_numpy", "mtp_torch")
API_DIR = Path(__file__).resolve().parent / "api"
ROOT = API_DIR.parents[1]
SOURCES = (ROOT / "backends" / "torch", ROOT / "backends" / "numpy", ROOT)

_DIRECTIVES = (
    "autoclass|autofunction|autodata|autoattribute|automethod|autoexception|autoproperty|"
    "py:class|py:function|py:data|py:attribute|py:exception|py:method|py:property"
)
# ".. autoclass:: name" (reST) and "```{autoclass} name" / ":::{autoclass} name" (MyST).
_RST = re.compile(rf"^\s*\.\.\s+({_DIRECTIVES})::\s+([\w.]+)", re.MULTILINE)
_MYST = re.compile(rf"^\s*(?:`{{3,}}|:{{3,}})\{{({_DIRECTIVES})\}}\s+([\w.]+)", re.MULTILINE)


def documented_names(api_dir: Path = API_DIR) -> dict[str, str]:
    """Fully qualified names documented on the API pages, mapped to their directive.

    Args:
      api_dir: the folder of API pages (``.rst`` and ``.md``, searched recursively).

    Returns:
      ``{"mtp_core.ConfAdapt": "autoclass", ...}``.
    """
    found: dict[str, str] = {}
    for page in sorted([*api_dir.rglob("*.rst"), *api_dir.rglob("*.md")]):
        text = page.read_text(encoding="utf-8")
        for pattern in (_RST, _MYST):
            for directive, name in pattern.findall(text):
                found.setdefault(name, directive)
    return found


def _where(obj: object) -> str:
    """``file:line`` of an object's definition, or ``?`` when unknown."""
    target = inspect.unwrap(obj) if callable(obj) else obj
    try:
        path = inspect.getsourcefile(target)  # type: ignore[arg-type]
        _, line = inspect.getsourcelines(target)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return "?"
    if path is None:
        return "?"
    try:
        path = str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    return f"{path}:{line}"


def _own_doc(obj: object) -> str | None:
    """The object's docstring, or ``None`` when it has none (or only whitespace).

    A class's ``__doc__`` is never inherited, so a class without its own docstring has none.
    """
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return doc


def _is_constant(obj: object) -> bool:
    """True for values (strings, tuples, type aliases), which carry no docstring of their own."""
    if type(obj).__module__ == "typing":  # Literal[...], Union[...] and other aliases
        return True
    return not (
        inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or callable(obj)
    )


def _has_source_doc_comment(module_name: str, name: str) -> bool:
    """True when ``name`` has a ``#:`` comment or a docstring after its assignment."""
    from sphinx.pycode import ModuleAnalyzer, PycodeError

    try:
        analyzer = ModuleAnalyzer.for_module(module_name)
        analyzer.analyze()
    except PycodeError:
        return False
    return ("", name) in analyzer.attr_docs


def _defining_module(package: object, name: str) -> str | None:
    """The private module that assigns a re-exported constant, found by its ``from`` import."""
    source_file = getattr(package, "__file__", None)
    if source_file is None:
        return None
    text = Path(source_file).read_text(encoding="utf-8")
    match = re.search(rf"^from\s+([\w.]+)\s+import\s+{re.escape(name)}\b", text, re.MULTILINE)
    return match.group(1) if match else None


def _member_problems(cls: type, qualified: str) -> list[str]:
    """Public methods and properties a class defines without a docstring."""
    problems = []
    for member_name, member in vars(cls).items():
        if member_name.startswith("_"):
            continue
        target = member.fget if isinstance(member, property) else member
        if isinstance(target, (staticmethod, classmethod)):
            target = target.__func__
        if not (inspect.isfunction(target) or isinstance(member, property)):
            continue
        if _own_doc(target) is None:
            problems.append(f"{qualified}.{member_name}: no docstring ({_where(target)})")
    return problems


def check_package(package_name: str, documented: dict[str, str]) -> list[str]:
    """Problems of one package: names missing from the API pages, or without a docstring.

    Args:
      package_name: an importable package with ``__all__``.
      documented: the output of ``documented_names``.

    Returns:
      One line per problem; empty when the package is fully covered.
    """
    try:
        package = importlib.import_module(package_name)
    except ImportError as error:
        return [f"{package_name}: cannot be imported ({error}); install it to check its docs"]
    names = getattr(package, "__all__", None)
    if names is None:
        return [f"{package_name}: defines no __all__, so its public names are unknown"]
    problems: list[str] = []
    for name in names:
        qualified = f"{package_name}.{name}"
        if not hasattr(package, name):
            problems.append(f"{qualified}: listed in __all__ but not defined")
            continue
        obj = getattr(package, name)
        directive = documented.get(qualified)
        if directive is None:
            problems.append(f"{qualified}: not on any API page under docs/api/")
        if _is_constant(obj):
            if directive == "autodata":
                module_name = _defining_module(package, name) or package_name
                if not _has_source_doc_comment(module_name, name):
                    problems.append(
                        f"{qualified}: a constant documented with autodata but without a '#:' "
                        f"comment in {module_name}; add one, or use '.. py:data::' with text"
                    )
            continue
        if _own_doc(obj) is None:
            problems.append(f"{qualified}: no docstring ({_where(obj)})")
        if inspect.isclass(obj):
            problems.extend(_member_problems(obj, qualified))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Check the packages named on the command line (default: all three) and report.

    Args:
      argv: package names; ``None`` reads ``sys.argv``.

    Returns:
      0 when every public name is documented, 1 otherwise.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES))
    args = parser.parse_args(argv)
    # Import from this checkout's sources (as docs/conf.py does), whatever is installed.
    for source in SOURCES:
        if str(source) not in sys.path:
            sys.path.insert(0, str(source))
    documented = documented_names()
    problems: list[str] = []
    counted = 0
    for package_name in args.packages:
        found = check_package(package_name, documented)
        problems.extend(found)
        package = sys.modules.get(package_name)
        counted += len(getattr(package, "__all__", ()) or ())
    _report(problems, counted)
    return 1 if problems else 0


def _report(problems: Iterable[str], counted: int) -> None:
    problems = list(problems)
    if problems:
        print(f"API documentation incomplete ({len(problems)} problem(s)):", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
    else:
        print(f"API documentation complete: {counted} public names documented.")


if __name__ == "__main__":
    sys.exit(main())
