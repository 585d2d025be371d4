"""What the estimators tell the user: warnings at the user's line, errors that name
the rows and the stage where values stopped being finite, and solver reports
(``CGResult``) turned into ConvergenceWarnings that name the parameter to change.

The layers below report (result objects, exceptions); only the estimator layer
warns, through :func:`warn`.
"""

import math
import os
import sys
import warnings

import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning

__all__ = [
    "actions",
    "check_finite",
    "check_low_rank_variance",
    "check_regression_solve",
    "nonfinite_error",
    "nonfinite_rows",
    "warn",
    "warn_solve",
]

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# sklearn's _fit_context wraps every fit (and the mixins' score calls predict) here.
_SKLEARN_BASE = os.path.join(os.path.dirname(os.path.abspath(sklearn.__file__)), "base.py")


def _internal(filename):
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE + os.sep) or path == _SKLEARN_BASE


def warn(message, category=UserWarning):
    """``warnings.warn`` pointing at the first frame outside this package (and
    sklearn's fit wrapper): the user's line, however deep the call."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def nonfinite_rows(values):
    """Indices of the rows (first axis) of ``values`` with a NaN or infinite entry."""
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return torch.nonzero(bad).reshape(-1).tolist()


def nonfinite_error(rows, n_rows, what, advice, offset=0):
    """The ValueError of :func:`check_finite` for the rows ``rows`` of ``n_rows``
    (an empty list where the values were seen in a product only)."""
    where = ""
    if rows:
        shown = ", ".join(str(offset + row) for row in rows[:10])
        more = ", ..." if len(rows) > 10 else ""
        where = f" for {len(rows)} of {n_rows} samples (rows {shown}{more})"
    return ValueError(f"{what} are NaN or infinite{where}; {advice}.")


def check_finite(values, what, advice, offset=0):
    """Raise ValueError naming the rows of ``values`` (n, ...) that are not finite.

    Parameters
    ----------
    values : torch.Tensor of shape (n, ...)
    what : str
        What the values are and where they come from, for the message ("The
        network's outputs on X").
    advice : str
        The likely cause and what to do.
    offset : int, default=0
        Index of the first row in the caller's numbering (chunks).
    """
    rows = nonfinite_rows(values)
    if rows:
        raise nonfinite_error(rows, values.shape[0], what, advice, offset)


def actions(*choices):
    """ "Use dtype='float64', increase noise, or loosen tol.": the non-empty choices
    as one sentence."""
    choices = [choice for choice in choices if choice]
    text = choices[0] if len(choices) == 1 else ", ".join(choices[:-1])
    if len(choices) > 1:
        text += f", or {choices[-1]}"
    return text[0].upper() + text[1:] + "."


def warn_solve(name, report, stage, *, tol, dtype, advice):
    """A ConvergenceWarning where a CG solve (``report``, a CGResult, or None for
    none) fell short of its stopping rule, naming what to change.

    Parameters
    ----------
    name : str
        The estimator's class name.
    report : CGResult or None
    stage : str
        Which solve, for the message ("the fit's solve").
    tol : float
        The tolerance it ran under.
    dtype : str
        The dtype it ran in ("float32" or "float64").
    advice : str
        What helps the conditioning ("increase noise", "lower prior").
    """
    if report is None or report.all_converged:
        return
    total = report.converged.numel()
    if report.any_drifted:
        worst = float(report.true_residual_norms[report.drifted].max())
        float64 = "use dtype='float64'" if dtype != "float64" else ""
        warn(
            f"{name}: conjugate gradient ({stage}) met the stopping rule at "
            f"tol={tol:g} by its recurrence, but the true residual ‖b - Ax‖/‖b‖ of "
            f"{int(report.drifted.sum())} of {total} right-hand sides is "
            f"{worst:.3g} after {report.restarts} restart(s): rounding in {dtype} "
            "made the recurrence drift, and the result is less accurate than tol "
            f"says. {actions(float64, advice, 'loosen tol')}",
            ConvergenceWarning,
        )
        return
    unconverged = int((~report.converged).sum())
    fixes = actions("increase max_iter", "loosen tol", advice, "use solver='dense'")
    warn(
        f"{name}: conjugate gradient ({stage}) stopped after "
        f"max_iter={report.max_iter} iterations with {unconverged} of {total} "
        f"right-hand sides short of the stopping rule at tol={tol:g} (worst relative "
        f"residual {float(report.residual_norms.max()):.3g}). "
        f"{fixes}",
        ConvergenceWarning,
    )


# A CG fit warns where rounding alone may move the mean by more than this times tol
# (see check_regression_solve).
MEAN_ACCURACY_FACTOR = 10.0
# Outputs whose fitted residuals' mean squares differ by more than this factor warn
# (see check_output_noise).
OUTPUT_NOISE_MAX_RATIO = 10.0
# The network's outputs rounded to steps above this fraction of the noise std warn
# (see check_output_rounding).
OUTPUT_ROUNDING_MAX_RATIO = 0.1
# variance="low_rank" warns above this tail weight.
LOW_RANK_MAX_TAIL_WEIGHT = 0.1


def check_regression_solve(estimator, posterior, scale):
    """Errors and warnings on the fit's solve: not finite, short of its stopping
    rule, or finer than its dtype resolves.

    The last: with c = noise/prior, λ the largest eigenvalue of JᵀJ and u the
    unit roundoff, products rounded to u·λ·‖δ‖ move δ by A⁻¹ of that, and the
    mean at the training inputs by at most u·λ·‖δ‖ / (2√c), since
    ‖J A⁻¹‖ ≤ 1/(2√c); relative to ``scale`` (‖y‖, the mean's size), a
    first-order bound that was 1.5-15 times the float32 errors measured
    against float64 (noise 1e-8 to 1e-1, 600 samples, p = 745).
    """
    solve = f"the fit's {posterior.space}-space {posterior.choices.solver} solve"
    float64 = "use dtype='float64'" if estimator.dtype != "float64" else ""
    delta = posterior.delta
    if not bool(torch.isfinite(delta).all()):
        raise FloatingPointError(
            f"{type(estimator).__name__}: {solve} returned NaN or infinite values, "
            "although the network's outputs and Jacobian on X are finite: the "
            f"system is too ill-conditioned (noise={posterior.noise:g}, "
            f"prior={posterior.prior:g}) or y too large for {estimator.dtype}. "
            + actions(float64, "increase noise", "lower prior", "rescale y")
        )
    warn_solve(
        type(estimator).__name__,
        posterior.report,
        "the fit's solve",
        tol=estimator.tol,
        dtype=estimator.dtype,
        advice=estimator._conditioning_advice,
    )
    kappa = posterior.condition_number
    c = posterior.noise / posterior.prior
    unit = torch.finfo(delta.dtype).eps / 2
    norm = float(torch.linalg.vector_norm(delta.double()))
    bound = unit * (kappa - 1.0) * c**0.5 * norm / (2.0 * max(scale, 1e-300))
    if bound > MEAN_ACCURACY_FACTOR * estimator.tol:
        warn(
            f"{type(estimator).__name__}: {solve} is too ill-conditioned for "
            f"{estimator.dtype}: with noise/prior = {c:.3g} its condition number is "
            f"about {kappa:.2g}, and rounding alone may move the predictive mean "
            f"by up to {min(bound, 1.0):.2g} (relative; a first-order bound at the "
            f"training inputs), more than {MEAN_ACCURACY_FACTOR:g}·tol = "
            f"{MEAN_ACCURACY_FACTOR * estimator.tol:g}. "
            + actions(float64, "increase noise", "lower prior"),
            ConvergenceWarning,
        )


def check_output_noise(estimator, posterior, jacobian, residuals, reduction):
    """Warn where one noise variance cannot describe every output.

    The noise σ² is shared by the outputs. The fitted mean's residuals at the
    training inputs, r - Jδ (rows scaled by √w_i, so that each has variance σ²
    under the model), then have about the same mean square for every output; where
    two outputs' differ by more than ``OUTPUT_NOISE_MAX_RATIO``, the intervals are
    too wide for one and too narrow for the other (two outputs in units 100 apart,
    defaults: coverage of the 95% intervals 100% and 86%, the first output's std 10
    times its error). One JVP pass over the training data, for several outputs only.
    """
    n_outputs = residuals.shape[1]
    if n_outputs == 1:
        return
    fitted = residuals - jacobian.jvp(posterior.delta)
    squares = reduction.sum(fitted.square().sum(0)).double().cpu()
    low, high = int(squares.argmin()), int(squares.argmax())
    ratio = float(squares[high] / squares[low].clamp_min(torch.finfo(torch.float64).tiny))
    if ratio <= OUTPUT_NOISE_MAX_RATIO:
        return
    mean_squares = squares / reduction.sum_float(residuals.shape[0])
    units = " (of the standardized y)" if estimator.normalize_y else ""
    warn(
        f"{type(estimator).__name__}: the {n_outputs} outputs share one noise "
        f"variance, noise_ = {posterior.noise:.3g}{units}, but the fitted mean's "
        f"residuals at the training inputs have mean squares from "
        f"{float(mean_squares[low]):.3g} (output {low}) to "
        f"{float(mean_squares[high]):.3g} (output {high}), {ratio:.3g} times "
        "larger: the predictive intervals are too wide for the outputs with small "
        "residuals and too narrow for those with large ones. "
        + actions(
            ""
            if estimator.normalize_y
            else "set normalize_y=True (each output standardized)",
            "fit one estimator per output (each with a network of that output alone)",
        )
    )


def check_output_rounding(estimator, posterior, outputs, y_scale, reduction):
    """Warn where the dtype rounds the network's outputs, the prior mean, to a
    step comparable to the noise.

    The outputs f_θ(X) come from the network in the estimator's dtype, rounded to
    ε·|f| (ε its machine epsilon); where that step exceeds
    ``OUTPUT_ROUNDING_MAX_RATIO`` times the fitted noise std (in y's units) for an
    output, the fit takes the rounding for noise and the mean is no more accurate
    than it (float32, outputs near 1e6, noise std 1e-3: mean error 0.018 against
    float64's 0.0008, the latent std 8 times too small). Only with
    ``prior_mean="network"``: otherwise the outputs are not used.
    """
    if estimator.prior_mean != "network":
        return
    largest = reduction.maximum(outputs.abs().amax(0)).double().cpu()
    step = torch.finfo(outputs.dtype).eps * largest
    noise_std = math.sqrt(posterior.noise) * y_scale.double().cpu()
    ratio = step / noise_std
    worst = int(ratio.argmax())
    if float(ratio[worst]) <= OUTPUT_ROUNDING_MAX_RATIO:
        return
    output = f" {worst}" if outputs.shape[1] > 1 else "s"
    warn(
        f"{type(estimator).__name__}: {estimator.dtype} rounds the network's "
        f"output{output} on X (up to {float(largest[worst]):.3g} in magnitude) to "
        f"steps of up to {float(step[worst]):.2g}, {float(ratio[worst]):.2g} times "
        f"the fitted noise std ({float(noise_std[worst]):.2g}): the fit takes that "
        "rounding for noise, and the predictive mean is no more accurate than it. "
        + actions(
            "use dtype='float64'",
            "take the offset out of the network and y (for example from the final "
            "layer's bias)",
        )
    )


def check_low_rank_variance(variance, posterior):
    """Warn where the low-rank variance stopped short of the noise level.

    A direction left out weighing more than ``LOW_RANK_MAX_TAIL_WEIGHT`` means a
    rank cap was hit well before the noise level: the variances may be
    overestimated by up to that fraction of the prior variance.
    """
    weight = posterior.variance_tail_weight
    if variance != "low_rank" or weight <= LOW_RANK_MAX_TAIL_WEIGHT:
        return
    warn(
        f"The low-rank variance stopped at rank {posterior.rank} with directions "
        f"left out weighing up to {weight:.2f} (above {LOW_RANK_MAX_TAIL_WEIGHT}): "
        "predictive variances may be overestimated by up to that fraction of the "
        "prior variance. Increase rank, or use variance='exact'."
    )
