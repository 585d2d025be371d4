"""Sphinx configuration for sklearn-fntk.

Build from the repository root (this is what .ci/run does)::

    SKLEARN_FNTK_EXAMPLE_SMALL=1 python -m sphinx -W --keep-going -b html \
        docs docs/_build/html

Add ``-D plot_gallery=0`` to skip running the examples while editing text.

The build needs no network, and neither do the pages it writes:

- intersphinx reads small local inventories written by ``sphinxext/inventories.py``
  (with the real addresses of scikit-learn's, NumPy's, SciPy's, PyTorch's and
  Python's pages), never a downloaded ``objects.inv``;
- MathJax is served from the build itself (``sphinx-mathjax-offline``), not a CDN;
- the theme loads no remote fonts or scripts.
"""

import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "sphinxext"))

# The examples read this to run small (fewer epochs, smaller grids); the gallery
# executes every example during the build, so keep them quick.
os.environ.setdefault("SKLEARN_FNTK_EXAMPLE_SMALL", "1")

from inventories import write_inventories  # noqa: E402

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
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "generated/backreferences/*",
    # sphinx-gallery's overall computation-times page loads a CDN script.
    "sg_execution_times.rst",
]
root_doc = "index"
# ``code`` in the reST sources means inline Python.
default_role = "literal"
# Every cross-reference must resolve (locally or through the inventories below).
nitpicky = True
nitpick_ignore_regex = [
    # numpydoc turns the words of a parameter's type into references; these are
    # shapes and descriptions ("of shape (n_samples, n_outputs)", "fitted
    # estimator"), or fitted attributes named in a shape (``n_params_``).
    ("py:obj", r"n_\w+|\w+_|the|fitted|\d+|k|m|C|n|p"),
]

# -- intersphinx (local inventories: see sphinxext/inventories.py) --------------------

intersphinx_mapping = {
    project_: (url, inventory)
    for project_, (url, inventory) in write_inventories(
        HERE / "_build" / "intersphinx"
    ).items()
}

# -- autodoc / autosummary / numpydoc -------------------------------------------------

autosummary_generate = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"
# The class docstrings list their parameters and attributes; the methods are
# documented by the class template (``_templates/autosummary/class.rst``).
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = True
numpydoc_xref_aliases = {
    "Module": "torch.nn.Module",
    "Tensor": "torch.Tensor",
    "ndarray": "numpy.ndarray",
    "RandomState": "numpy.random.RandomState",
    "estimator": "sklearn.base.BaseEstimator",
}
numpydoc_xref_ignore = {"of", "or", "shape", "default", "optional", "instance"}
# Every numpydoc check, except:
#   ES01 (extended summary): short methods (predict_log_proba) need none;
#   SA01, EX01 (See Also, Examples) on every method: the classes and functions have
#     both; their methods are shown on the class's page, next to them;
#   RT02 (a bare type on the first line of Returns): scikit-learn names what it
#     returns (``self : object``, ``mean, std``), and so do we.
numpydoc_validation_checks = {"all", "ES01", "SA01", "EX01", "RT02"}
# The methods scikit-learn's base classes give every estimator carry scikit-learn's
# docstrings, which are not ours to fix.
numpydoc_validation_exclude = {
    r"\.get_params$",
    r"\.set_params$",
    r"\.score$",
    r"\.set_\w+_request$",
    r"\.get_metadata_routing$",
}

# -- sphinx-gallery -------------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # Run every example (not only plot_*.py).
    "filename_pattern": re.escape(os.sep) + r".*\.py$",
    # Nothing is excluded. If an example ever has to be, add it here with the reason.
    "ignore_pattern": r"__init__\.py$",
    # The quick start first (sphinxext/gallery_order.py).
    "within_subsection_order": "gallery_order.ExampleOrder",
    "download_all_examples": False,
    # The computation-times page loads its table script from a CDN: not written.
    "write_computation_times": False,
    # "Examples using this class" on every API page (_templates/autosummary).
    "backreferences_dir": "generated/backreferences",
    "doc_module": ("sklearn_fntk",),
    "reference_url": {"sklearn_fntk": None},
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
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_prev_next": True,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
    "header_links_before_dropdown": 6,
}
html_show_sourcelink = False
html_copy_source = False
