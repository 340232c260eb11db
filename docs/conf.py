"""Sphinx configuration: Markdown pages (MyST) plus an API reference from the docstrings."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wsgi_detach  # noqa: E402

project = "wsgi_detach"
author = "wsgi_detach contributors"
copyright = "2026, wsgi_detach contributors"
release = wsgi_detach.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "wsgi_detach"
