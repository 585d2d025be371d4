"""The numerical policy of a fit: sizes, ranks and thresholds, in one object.

Every "auto" choice and every adaptive stop reads its constants from a
:class:`Policy`, which the estimators pass down, so that tests (and benchmarks) set a
value instead of patching a module. How the defaults were measured is recorded in
docs/benchmarks.rst.
"""

from dataclasses import dataclass

__all__ = ["Choices", "Policy", "resolve_choices"]


@dataclass(frozen=True)
class Policy:
    """Constants of the automatic choices and adaptive stops.

    Attributes
    ----------
    dense_max_size : int, default=4096
        ``solver="auto"`` picks the dense (Cholesky) solver up to this system size.
    variance_factor_max_size : int, default=8192
        Exact predictive variances come from a dense Cholesky factor of the system,
        assembled once at fit time (whatever the solver), up to this size (512 MiB
        in float64); above it from CG solves. ``variance="auto"`` with CG is exact up
        to it, low-rank above (in parameter space, see also ``factor_bytes``).
    factor_bytes : int, default=2**31
        In parameter space the regressor's system A = JᵀJ + (σ²/s)·I (p x p) is
        assembled over the data chunks and factored, whatever n, when its array
        takes at most this many bytes (2 GiB: p ≤ 23,170 in float32, 16,383 in
        float64) ...
    factor_max_cost : float, default=3e13
        ... and assembling it costs at most this many multiply-adds, n·k·p²/2
        (n = 100,000 at p = 21,825 is 2.4e13: 7.5 min on the 2-core machine of
        docs/benchmarks.rst, ~100 Gflop/s). The factor then solves for the mean too
        (``solver="auto"`` is "dense"), gives exact variances, and its Gram matrix
        the evidence. Above, ``variance="auto"`` is the low-rank bound.
    eigen_size : int, default=4096
        The low-rank variance takes exact eigenpairs (one ``eigh`` of J Jᵀ or JᵀJ) up
        to this system size, and a Nyström sketch above it.
    low_rank_weight : float, default=0.01
        The low-rank variance keeps the directions of JᵀJ whose weight f/(f + c)
        exceeds this; a sketch grows until its last weight is at most this.
    low_rank_bytes : int, default=2**29
        Memory cap on the low-rank variance's factor (p, r): it bounds r.
    nystrom_ratio : float, default=10.0
        An adaptive Nyström preconditioner grows until λ̂_r ≤ this times the shift.
    max_rank : int, default=512
        Cap on adaptive Nyström and pivoted Cholesky ranks.
    sketch_samples_per_rank : int, default=4
        A parameter-space sketch of a Fisher (a sum over samples) sees the Fisher of
        this many random samples per unit of rank over the output count ...
    sketch_min_samples : int, default=1024
        ... and of at least this many.
    evidence_probes : int, default=16
        Rademacher probes of the matrix-free (Lanczos) evidence's log-determinant.
    evidence_log_det_steps : int, default=150
        Lanczos steps per probe of that log-determinant. Fewer bias it: the kernel's
        many small eigenvalues need nodes near σ²/s (n = 2000, a trained MLP: 40
        steps gave log|K| 133 nats short and optima 24% / 34% off; 100 and more
        steps left only the probes' sampling error, 1-2% on the optima).
    evidence_quadratic_steps : int, default=200
        Lanczos steps of its quadratic term rᵀK⁻¹r (exact once they reach the
        number of distinct eigenvalues).
    evidence_gap_nats : float, default=1.0
        Those steps are where the two runs start. Where a term's Gauss and
        Gauss-Radau quadratures (which bracket it) differ by more than half this
        at the fitted (noise, prior), its run doubles its steps, and the fit
        searches again; a fit still short of it warns. The default steps are
        far short on large data: at n = 20,000, p = 4801 the gap was 264 nats and
        the fitted prior 45 against the exact optimum's 212; doubling twice, to
        600 / 800 steps, reached it (benchmarks/evidence_steps.py).
    evidence_max_growth : int, default=8
        The runs grow to at most this many times their first steps ...
    evidence_basis_bytes : int, default=2**30
        ... and while each run's Lanczos bases (columns x steps x order entries,
        kept for the full reorthogonalisation) take at most this many bytes: with
        16 probes at p = 21,825 in float32, 768 log-determinant steps; and at
        most what the memory guard allows a new allocation at each doubling (the
        first steps' bases are checked before they are allocated).
    laplace_evidence_probes : int, default=32
        Rademacher probes of the classifier's stochastic log-determinant (CG solver).
    laplace_evidence_steps : int, default=50
        Lanczos steps per probe of that estimate (log|B| with B ⪰ I: the shift 1
        keeps the small eigenvalues from needing many nodes).
        The first steps: they grow as ``evidence_gap_nats``, ``evidence_max_growth``
        and ``evidence_basis_bytes`` say (the Gauss-Radau rule fixes a node at 1).
    probit_error : float or None, default=1e-3
        The classifier's probit link after a dense fit of size up to ``eigen_size``
        takes its logit variances from the top eigenpairs of the Laplace precision
        (kept at the first probit prediction) and accepts probabilities within this
        of the exact probit formula's; a test point whose guaranteed bound exceeds
        it gets its exact covariance instead. None: always exact.
    probit_tail_weight : float, default=1e-3
        That low-rank covariance keeps the directions of weight above this (on the
        digits example, 775 of 1797 directions, the largest error 6e-6; see
        benchmarks/probit_speed.py).
    """

    dense_max_size: int = 4096
    variance_factor_max_size: int = 8192
    factor_bytes: int = 1 << 31
    factor_max_cost: float = 3e13
    eigen_size: int = 4096
    low_rank_weight: float = 0.01
    low_rank_bytes: int = 1 << 29
    nystrom_ratio: float = 10.0
    max_rank: int = 512
    sketch_samples_per_rank: int = 4
    sketch_min_samples: int = 1024
    evidence_probes: int = 16
    evidence_log_det_steps: int = 150
    evidence_quadratic_steps: int = 200
    evidence_gap_nats: float = 1.0
    evidence_max_growth: int = 8
    evidence_basis_bytes: int = 1 << 30
    laplace_evidence_probes: int = 32
    laplace_evidence_steps: int = 50
    probit_error: float | None = 1e-3
    probit_tail_weight: float = 1e-3

    def lanczos_options(self, generator):
        """The options of ``LanczosSpectrum``."""
        return {
            "n_probes": self.evidence_probes,
            "log_det_steps": self.evidence_log_det_steps,
            "quadratic_steps": self.evidence_quadratic_steps,
            "generator": generator,
            "gap_nats": self.evidence_gap_nats,
            "max_growth": self.evidence_max_growth,
            "basis_bytes": self.evidence_basis_bytes,
        }

    def factors(self, space, size, n_rows, itemsize, available=None):
        """Whether a fit assembles and factors its system (``size`` x ``size``, over
        ``n_rows`` = n·k rows, entries of ``itemsize`` bytes) for exact variances:
        up to ``variance_factor_max_size``, and in parameter space also within
        ``factor_bytes`` and ``factor_max_cost`` and, when ``available`` (bytes the
        process can still allocate) is given, where twice the array fits in it
        (the array, and the blocks, features and predictions around it): on a
        smaller machine the default stays the matrix-free path that fits."""
        if size <= self.variance_factor_max_size:
            return True
        array = size * size * itemsize
        affordable = (
            array <= self.factor_bytes
            and n_rows * size * size / 2 <= self.factor_max_cost
            and (available is None or 2 * array <= available)
        )
        return space == "parameter" and affordable

    def sketch_samples(self, n_samples, rank, n_outputs):
        """Training samples a Nyström sketch of a Fisher (a sum over samples, k rows
        each) sees when its rank may reach ``rank``: max(``sketch_samples_per_rank``
        · rank/k, ``sketch_min_samples``), at most n. The sketch is of the rescaled
        Fisher of a random subset (unbiased); the preconditioner needs the Fisher's
        dominant subspace only roughly, and CG still solves the exact system."""
        per_rank = -(-self.sketch_samples_per_rank * rank // n_outputs)
        return min(n_samples, max(per_rank, self.sketch_min_samples))


@dataclass(frozen=True)
class Choices:
    """Every "auto" resolved: what a fit does, reported in fitted attributes.

    Attributes
    ----------
    space : {"function", "parameter"}
    solver : {"dense", "cg"}
    preconditioner : {"jacobi", "nystrom", "pivoted_cholesky"} or None
        None for the dense solver, or when none was asked for.
    variance : {"exact", "low_rank"} or None
        None where the estimator has no such choice (the classifier).
    """

    space: str
    solver: str
    preconditioner: str | None
    variance: str


def resolve_choices(
    *,
    space,
    solver,
    preconditioner,
    variance,
    n_rows,
    n_params,
    layerwise,
    policy,
    itemsize=8,
    available=None,
    distributed=False,
):
    """Resolve every "auto" of a fit, in one place.

    Parameters
    ----------
    space : {"auto", "function", "parameter"}
        "auto": the smaller system (n·k rows against p parameters).
    solver : {"auto", "dense", "cg"}
        "auto": dense up to ``policy.dense_max_size``, and for the regressor in
        parameter space wherever the exact variances factor the system anyway
        (``Policy.factors``): the factor solves for the mean too.
    preconditioner : {"auto", "jacobi", "nystrom", "pivoted_cholesky"} or None
        "auto": the low-rank variance's eigenpairs where there are some (Nyström, no
        further products), else pivoted Cholesky where kernel columns are cheap (the
        layerwise kernel in function space), else Nyström.
    variance : {"auto", "exact", "low_rank"} or None
        None: no variance choice (the classifier). "auto": exact with the dense
        solver, or with CG where ``Policy.factors`` (from a dense factor);
        low-rank above.
    n_rows, n_params : int
        n·k and p.
    layerwise : bool
        Whether the layerwise kernel applies to the network (in function space).
    policy : Policy
    itemsize : int, default=8
        Bytes per entry of the fit's dtype.
    available : float or None, default=None
        Bytes the process can still allocate (see ``Policy.factors``); None: no
        bound.
    distributed : bool, default=False
        A data-parallel fit (``n_rows`` over all shards): see
        :func:`_check_distributed`.

    Returns
    -------
    Choices
    """
    if distributed and space == "function":
        raise ValueError(
            "A data-parallel fit (distributed=True) solves in parameter space: the "
            "function-space kernel is n x n over all shards. Use space='parameter' "
            "or 'auto'."
        )
    if distributed:
        space = "parameter"
    if space == "auto":
        space = "function" if n_rows <= n_params else "parameter"
    if preconditioner == "pivoted_cholesky" and space != "function":
        raise ValueError(
            "preconditioner='pivoted_cholesky' needs kernel columns, so it works in "
            f"function space only; this fit solves in {space} space. Use "
            "space='function' or preconditioner='nystrom'."
        )
    size = n_rows if space == "function" else n_params
    factored = policy.factors(space, size, n_rows, itemsize, available)
    if solver == "auto":
        small = size <= policy.dense_max_size
        # the regressor's exact variances factor the system anyway: it solves too
        factor_solves = space == "parameter" and variance in ("auto", "exact")
        solver = "dense" if small or (factor_solves and factored) else "cg"
    if variance == "auto":  # above the factor's size, a CG solve per test batch
        variance = "exact" if solver == "dense" or factored else "low_rank"
    if solver == "dense":
        preconditioner = None  # nothing to precondition
    elif preconditioner == "auto":
        cheap_columns = space == "function" and layerwise
        use_pivoted = cheap_columns and variance != "low_rank"
        preconditioner = "pivoted_cholesky" if use_pivoted else "nystrom"
    choices = Choices(space, solver, preconditioner, variance)
    if distributed:
        _check_distributed(choices, n_params, factored, policy)
    return choices


def _check_distributed(choices, n_params, factored, policy):
    """ValueError unless a data-parallel fit can make ``choices``.

    It solves in parameter space: there every sum over the data is a p-vector, a
    p x p matrix or a number, whereas function space holds n·k x n·k kernels whose
    dense form, pivoted Cholesky columns and Nyström sketches do not split into
    per-shard sums. Its predictive variances must come from what the fit leaves on
    every process: a p x p Cholesky factor (dense solver, or with CG where
    ``Policy.factors``) or the exact eigenpairs of JᵀJ (low-rank, up to
    ``eigen_size``); a CG solve per test batch, or a sketch of J's range
    (n-vectors orthonormalised across the shards), would need the other shards
    at predict time.
    """
    if choices.variance == "low_rank":
        fits, what = n_params <= policy.eigen_size, "the exact eigenpairs of JᵀJ"
        limit = f"up to {policy.eigen_size} parameters"
    elif choices.solver == "cg" and choices.variance == "exact":
        fits, what = factored, "a dense factor of JᵀJ + cI"
        limit = "within Policy.factor_bytes and factor_max_cost"
    else:
        return
    if not fits:
        raise ValueError(
            f"A data-parallel fit (distributed=True) with variance="
            f"{choices.variance!r} and solver={choices.solver!r} keeps {what} for "
            f"its predictive variances, {limit}; this network has "
            f"{n_params} parameters. Linearize fewer parameters (parameters=[...]), "
            "or fit on one process."
        )
