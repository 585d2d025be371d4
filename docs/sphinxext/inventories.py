"""Local intersphinx inventories, so that the build never downloads one.

intersphinx normally fetches ``objects.inv`` from each project's site. This build
runs without network access, so it writes small inventories of the objects these
docs refer to, with the real addresses of those projects' pages, and
``conf.py`` points ``intersphinx_mapping`` at them. A reference to an object missing
here is reported by the nitpicky build: add it to ``OBJECTS`` with its page.

The file format is Sphinx's inventory version 2 (a four-line header, then
zlib-compressed lines ``name domain:role priority uri display-name``). In
``OBJECTS`` a ``$`` in a page stands for the object's name.
"""

import zlib
from pathlib import Path

# project -> (base URL, version, {(name, "domain:role"): page relative to the base})
OBJECTS = {
    "sklearn": (
        "https://scikit-learn.org/stable/",
        "stable",
        {
            **{
                (name, "py:class"): "modules/generated/$.html#$"
                for name in (
                    "sklearn.base.BaseEstimator",
                    "sklearn.base.RegressorMixin",
                    "sklearn.base.ClassifierMixin",
                    "sklearn.compose.TransformedTargetRegressor",
                    "sklearn.exceptions.ConvergenceWarning",
                    "sklearn.gaussian_process.GaussianProcessRegressor",
                    "sklearn.gaussian_process.GaussianProcessClassifier",
                    "sklearn.gaussian_process.kernels.RBF",
                    "sklearn.linear_model.LogisticRegression",
                    "sklearn.multioutput.MultiOutputRegressor",
                    "sklearn.model_selection.GridSearchCV",
                    "sklearn.pipeline.Pipeline",
                    "sklearn.preprocessing.StandardScaler",
                )
            },
            **{
                (name, "py:function"): "modules/generated/$.html#$"
                for name in (
                    "sklearn.base.clone",
                    "sklearn.datasets.load_diabetes",
                    "sklearn.datasets.load_digits",
                    "sklearn.datasets.load_iris",
                    "sklearn.metrics.accuracy_score",
                    "sklearn.metrics.log_loss",
                    "sklearn.metrics.r2_score",
                    "sklearn.model_selection.cross_val_score",
                    "sklearn.pipeline.make_pipeline",
                )
            },
            ("sklearn.base.BaseEstimator.get_params", "py:method"): (
                "modules/generated/sklearn.base.BaseEstimator.html#$"
            ),
            ("sklearn.base.BaseEstimator.set_params", "py:method"): (
                "modules/generated/sklearn.base.BaseEstimator.html#$"
            ),
            ("metadata_routing", "std:label"): "metadata_routing.html#metadata-routing",
            ("scoring_parameter", "std:label"): (
                "modules/model_evaluation.html#scoring-parameter"
            ),
            ("glossary", "std:label"): "glossary.html#glossary",
        },
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        "stable",
        {
            ("numpy.ndarray", "py:class"): "reference/generated/$.html#$",
            ("array_like", "std:term"): "glossary.html#term-array_like",
            ("numpy.float64", "py:class"): "reference/arrays.scalars.html#$",
            ("numpy.random.RandomState", "py:class"): (
                "reference/random/legacy.html#$"
            ),
            ("numpy.random.Generator", "py:class"): "reference/random/generator.html#$",
        },
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy/",
        "stable",
        {
            ("scipy.sparse.linalg.cg", "py:function"): "reference/generated/$.html#$",
            ("scipy.optimize.minimize", "py:function"): "reference/generated/$.html#$",
            ("scipy.optimize.brentq", "py:function"): "reference/generated/$.html#$",
        },
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        "stable",
        {
            **{
                (name, "py:class"): "generated/$.html#$"
                for name in (
                    "torch.nn.Module",
                    "torch.nn.Sequential",
                    "torch.nn.Linear",
                    "torch.nn.Conv2d",
                    "torch.nn.Flatten",
                    "torch.nn.Tanh",
                    "torch.Generator",
                )
            },
            ("torch.nn.Module.named_parameters", "py:method"): (
                "generated/torch.nn.Module.html#$"
            ),
            ("torch.Tensor", "py:class"): "tensors.html#$",
            ("torch.device", "py:class"): "tensor_attributes.html#$",
            ("torch.dtype", "py:class"): "tensor_attributes.html#$",
            ("torch.func.jvp", "py:function"): "generated/$.html#$",
            ("torch.func.vjp", "py:function"): "generated/$.html#$",
            ("torch.func.jacrev", "py:function"): "generated/$.html#$",
            ("torch.func.functional_call", "py:function"): "generated/$.html#$",
            ("torch.set_num_threads", "py:function"): "generated/$.html#$",
            ("torch.manual_seed", "py:function"): "generated/$.html#$",
        },
    ),
    "python": (
        "https://docs.python.org/3/",
        "3",
        {
            **{
                (name, "py:class"): "library/functions.html#$"
                for name in ("int", "float", "bool", "object")
            },
            **{
                (name, "py:class"): "library/stdtypes.html#$"
                for name in ("str", "list", "tuple", "dict")
            },
            **{
                (name, "py:exception"): "library/exceptions.html#$"
                for name in (
                    "UserWarning",
                    "ValueError",
                    "MemoryError",
                    "KeyboardInterrupt",
                    "FloatingPointError",
                    "TypeError",
                    "RuntimeError",
                )
            },
            ("None", "py:data"): "library/constants.html#$",
            ("bltin-boolean-values", "std:label"): "library/stdtypes.html#$",
            ("True", "py:data"): "library/constants.html#$",
            ("False", "py:data"): "library/constants.html#$",
            ("pickle", "py:module"): "library/pickle.html#module-$",
            ("logging", "py:module"): "library/logging.html#module-$",
            ("warnings.filterwarnings", "py:function"): "library/warnings.html#$",
            ("threading", "py:module"): "library/threading.html#module-$",
        },
    ),
}


def write_inventories(directory):
    """Write ``<project>.inv`` for every project of ``OBJECTS`` into ``directory``.

    Returns ``{project: (base URL, path of its inventory)}`` for
    ``intersphinx_mapping``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (base, version, objects) in OBJECTS.items():
        header = (
            "# Sphinx inventory version 2\n"
            f"# Project: {project}\n"
            f"# Version: {version}\n"
            "# The remainder of this file is compressed using zlib.\n"
        )
        lines = "".join(
            f"{name} {role} 1 {page.replace('$', name)} -\n"
            for (name, role), page in sorted(objects.items())
        )
        path = directory / f"{project}.inv"
        path.write_bytes(header.encode() + zlib.compress(lines.encode()))
        mapping[project] = (base, str(path))
    return mapping
