"""Order of the examples in the gallery: the quick start first, then by topic."""

from pathlib import Path

ORDER = (
    "quickstart.py",
    "sinusoid_transfer.py",
    "diabetes_grid_search.py",
    "digits_domain_shift.py",
    "cost_scaling.py",
)


class ExampleOrder:
    """Sort key for sphinx-gallery's ``within_subsection_order``.

    Examples listed in ``ORDER`` come in that order; any other example follows them,
    by file name, so that a new example appears without editing this list.
    """

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = Path(filename).name
        rank = ORDER.index(name) if name in ORDER else len(ORDER)
        return f"{rank:03d}{name}"

    def __repr__(self):
        return f"ExampleOrder({ORDER})"
