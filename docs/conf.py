"""Sphinx configuration of the optax_clip documentation.

Build it with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"``); ``tests/test_docs.py`` runs the same build with
warnings as errors and executes every code block of every page.
"""

import optax_clip

project = "optax_clip"
author = "The optax_clip developers"
copyright = "2026, The optax_clip developers"  # noqa: A001 (Sphinx's name)
release = optax_clip.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings are Google style with reST roles (:func:, :math:), as in optax.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"optax_clip {release}"
