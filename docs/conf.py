"""Sphinx configuration for sklearn-fntk.

Build from the repository root (this is what .ci/run does)::

    SKLEARN_FNTK_EXAMPLE_SMALL=1 python -m sphinx -W --keep-going -b html \
        docs docs/_build/html

The build needs no network: intersphinx is not used, and the theme is configured
with no remote resources. MathJax is loaded by the browser when a page is viewed; the
build itself never fetches it.
"""

import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The examples read this to run small (fewer epochs, smaller grids); the gallery
# executes every example during the build, so keep them quick.
os.environ.setdefault("SKLEARN_FNTK_EXAMPLE_SMALL", "1")

import sklearn_fntk  # noqa: E402

# -- project --------------------------------------------------------------------------

project = "sklearn-fntk"
author = "sklearn-fntk developers"
copyright = "sklearn-fntk developers"
release = sklearn_fntk.__version__
version = ".".join(release.split(".")[:2])

# -- general --------------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb"]
root_doc = "index"
# ``code`` in the reST sources means inline Python.
default_role = "literal"
nitpicky = False

# -- autodoc / numpydoc ---------------------------------------------------------------

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"
# The class docstrings list their parameters and attributes; the methods are
# documented with explicit ``:members:`` lists in api.rst, so numpydoc need not
# generate member tables (which would warn about sklearn's dynamic set_*_request).
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# -- sphinx-gallery -------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # Run every example (not only plot_*.py).
    "filename_pattern": re.escape(os.sep) + r".*\.py$",
    # Nothing is excluded. If an example ever has to be, add it here with the reason.
    "ignore_pattern": r"__init__\.py$",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "backreferences_dir": None,
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "show_memory": False,
    "plot_gallery": "True",
    # Fail the build (with the others still run) if an example raises.
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    # Examples are run with the examples folder as working directory and write
    # their .png files there (ignored by git).
}

# matplotlib is driven without a display.
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings(
    "ignore",
    category=UserWarning,
    message="Matplotlib is currently using agg, which is a non-GUI backend",
)

# -- HTML -----------------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"sklearn-fntk {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_prev_next": True,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_show_sourcelink = False
html_copy_source = False
