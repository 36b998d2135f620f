"""Sphinx configuration of the mtp-lm documentation.

Build (warnings are errors):  sphinx-build -W --keep-going -b html docs docs/_build/html

No intersphinx: the build must work offline, and ``-W`` would turn a failed inventory fetch
into an error.  References to numpy / torch / transformers stay plain text.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The packages are normally installed (editable); these paths make a bare checkout build too.
for source in (ROOT, ROOT / "backends" / "numpy", ROOT / "backends" / "torch"):
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))

project = "mtp-lm"
author = "mtp-lm developers"
copyright = "2026, mtp-lm developers"
try:
    import mtp_core

    release = mtp_core.__version__
except ImportError:  # pragma: no cover - the build fails later with a clearer autodoc error
    release = "0.0.0"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# --- autodoc / napoleon ----------------------------------------------------------------------
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# Types go into the documented Args only: no second "Parameters" list of bare types.
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
# Keep numpy's long typing unions readable (the sources use `from __future__ import annotations`).
autodoc_type_aliases = {
    "npt.ArrayLike": "numpy.typing.ArrayLike",
    "npt.DTypeLike": "numpy.typing.DTypeLike",
}
autodoc_class_signature = "mixed"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# --- MyST --------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# --- HTML --------------------------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"mtp-lm {release}"
html_theme_options = {
    "description": "Multi-token prediction via self-distillation",
    "fixed_sidebar": True,
}


# --- one napoleon quirk ------------------------------------------------------------------------
# Napoleon reads the first line of a *property* docstring as "type: description", so a one-line
# summary with a colon in it ("Prediction positions read per step: ``k``.") would be split into
# a bogus type.  Property types come from the annotations anyway, so property docstrings are
# kept exactly as written: saved before napoleon runs (priority 400 < its 500), restored after.
_saved_property_docs: dict[str, list[str]] = {}


def _save_property_doc(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    if what == "property":
        _saved_property_docs[name] = list(lines)


def _restore_property_doc(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    if what == "property" and name in _saved_property_docs:
        lines[:] = _saved_property_docs.pop(name)


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-docstring", _save_property_doc, priority=400)
    app.connect("autodoc-process-docstring", _restore_property_doc, priority=600)
