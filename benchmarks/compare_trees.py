"""Time one benchmark script on two checkouts of the package, in alternating runs.

A refactoring tool: it shows that a change to the package changed no speed. Give it
two trees (for example a pristine worktree of the commit before the change, made with
``git worktree add /tmp/fntk_before <commit>``, and the working tree) and a benchmark
script's path relative to the repository root, with its arguments::

    python benchmarks/compare_trees.py --before /tmp/fntk_before --after /work/main \\
        --repeats 3 -- benchmarks/bench_core.py --quick --threads 1 --sizes 2000

It runs the script ``--repeats`` times from each tree, alternately (before, after,
before, after, ...; ``--abba`` alternates which goes first in each round, before
after, after before, ..., which cancels a linear drift of the machine's load). Each
run is a fresh subprocess of ``--python`` (default: this interpreter) with the
tree's root as its working directory and as ``PYTHONPATH`` (which puts the tree's
``sklearn_fntk`` ahead of any editable install), running the script taken from that
same tree: a benchmark that imports private modules must be updated in the after
tree along with the package. Before the runs, each tree is checked to import its
own ``sklearn_fntk``. Each run's wall time (of the whole subprocess: interpreter
start, imports, the benchmark's own setup such as training its network) is
measured, and its stdout and stderr are written to ``--logdir`` (default
/tmp/compare_trees) as ``<tree>-<round>.log``, with a ``summary.json``. The end
prints, per tree, the times, their median and minimum, and the ratios after/before
of the medians and of the minima; the exit status is 1 if any run failed.

Recommended invocations (times measured at commit d65e4f5 on 2 shared CPU cores):

``benchmarks/bench_core.py --quick --threads 1 --sizes 2000``
    75-95 s a run: (a) the kernel products at n = 2000 and (b) fit + predict at
    n = 2000 with every solver row (the explicit-Jacobian reference, 25 s of it,
    runs no package code and so is a control; peak RSS 3.2 GiB). Without
    ``--sizes 2000``, ``--quick`` also runs (a) at n = 20000. The script prints its
    own finer timings and ratios into each log; compare those too.

``benchmarks/bench_scale.py big --quick``
    About 35 s a run (n = 10,000 in float32, CG with Nyström, low-rank variance;
    with ``--env OMP_NUM_THREADS=1``).
    The other experiments with ``--quick`` take about 20 s (``fvp``), 15 s
    (``reference``, ``low_rank``) and 8 s (``nystrom``): use ``--repeats 5`` or
    more for those. bench_scale.py has no thread option: pass ``--env
    OMP_NUM_THREADS=1`` to keep the ratios stable on a shared machine.

Wall times on a shared machine drift by tens of percent; read a ratio within about
0.9-1.1 over three repeats as "no change", and rerun with more repeats (or
``--abba``) before believing a smaller difference.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPORT_CHECK = "import sklearn_fntk; print(sklearn_fntk.__file__)"


def child_environment(tree, extra):
    """The environment of a run from ``tree``.

    Parameters
    ----------
    tree : str
        Root of the checkout; it becomes ``PYTHONPATH`` (replacing any inherited one).
    extra : list of str
        ``NAME=VALUE`` settings added on top.

    Returns
    -------
    dict
    """
    env = dict(os.environ, PYTHONPATH=tree)
    for item in extra:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def check_tree(label, tree, script, python, env):
    """Check that ``tree`` holds ``script`` and imports its own ``sklearn_fntk``.

    Parameters
    ----------
    label : str
        "before" or "after", for messages.
    tree : str
        Root of the checkout.
    script : str
        The benchmark's path relative to ``tree``.
    python : str
        The interpreter.
    env : dict
        The run's environment (from :func:`child_environment`).

    Returns
    -------
    str or None
        None when the tree is usable, else why not.
    """
    if not os.path.isfile(os.path.join(tree, script)):
        return f"{label}: no {script} in {tree}"
    result = subprocess.run(
        [python, "-c", IMPORT_CHECK], cwd=tree, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = "\n    ".join(result.stderr.strip().splitlines()[-5:])
        return f"{label}: importing sklearn_fntk from {tree} failed:\n    {tail}"
    imported = os.path.realpath(result.stdout.strip())
    if not imported.startswith(os.path.realpath(tree) + os.sep):
        return f"{label}: {tree} imports sklearn_fntk from {imported}, not its own"
    print(f"{label}: {tree} imports {imported}")
    return None


def run_once(tree, command, python, env, log_path, timeout=None):
    """Run the benchmark once from ``tree``, logging its output.

    Parameters
    ----------
    tree : str
        Root of the checkout: the working directory.
    command : list of str
        The script's path relative to ``tree``, then its arguments.
    python : str
        The interpreter.
    env : dict
        The run's environment.
    log_path : str
        Where stdout and stderr go (interleaved).
    timeout : float or None
        Seconds before the run is killed (then counted as failed).

    Returns
    -------
    seconds : float
        Wall time of the subprocess.
    returncode : int
        Its exit status; -9 after a timeout.
    """
    with open(log_path, "w") as log:
        start = time.perf_counter()
        try:
            returncode = subprocess.run(
                [python, *command],
                cwd=tree,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            returncode = -9
        seconds = time.perf_counter() - start
    return seconds, returncode


def summarize(trees, times, failed):
    """Print per tree the times, median and minimum, and the after/before ratios.

    Parameters
    ----------
    trees : dict
        Label -> tree root.
    times : dict
        Label -> list of wall times of the successful runs.
    failed : dict
        Label -> number of failed runs.

    Returns
    -------
    dict
        Label -> {"median", "min"} (None where no run succeeded), and "ratio_median",
        "ratio_min" (after / before; None where undefined).
    """
    stats = {}
    print(f"\n{'tree':<7} {'median s':>9} {'min s':>8}  runs (s)")
    for label, tree in trees.items():
        values = times[label]
        median = statistics.median(values) if values else None
        minimum = min(values) if values else None
        stats[label] = {"median": median, "min": minimum}
        shown = " ".join(f"{value:.1f}" for value in values)
        if failed[label]:
            shown += f"  ({failed[label]} failed)"
        med = "-" if median is None else f"{median:.1f}"
        low = "-" if minimum is None else f"{minimum:.1f}"
        print(f"{label:<7} {med:>9} {low:>8}  {shown}   [{tree}]")
    for key in ("median", "min"):
        before, after = stats["before"][key], stats["after"][key]
        ratio = after / before if before and after is not None else None
        stats[f"ratio_{key}"] = ratio
        text = "-" if ratio is None else f"{ratio:.3f}"
        print(f"after / before ({key}): {text}")
    return stats


def parse_args(argv):
    """Split ``argv`` at the first ``--``: this script's options, then the command.

    Parameters
    ----------
    argv : list of str
        Without the program name.

    Returns
    -------
    argparse.Namespace
        With ``command``: the benchmark's path relative to the roots, and its args.
    """
    if "--" not in argv:
        argv = [*argv, "--"]
    split = argv.index("--")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --before TREE --after TREE [options] -- SCRIPT [ARGS ...]",
    )
    parser.add_argument("--before", required=True, help="root of the 'before' checkout")
    parser.add_argument("--after", required=True, help="root of the 'after' checkout")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree (3)")
    parser.add_argument(
        "--logdir", default="/tmp/compare_trees", help="run logs (/tmp/compare_trees)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter (default: this one)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable in every run (repeatable)",
    )
    parser.add_argument(
        "--abba", action="store_true", help="alternate which tree runs first per round"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds before a run is killed"
    )
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    if not args.command:
        parser.error("give the benchmark after '--': -- SCRIPT [ARGS ...]")
    if os.path.isabs(args.command[0]):
        parser.error("the script's path must be relative to the tree roots")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes NAME=VALUE, got {item!r}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None):
    """Command line; see the module docstring.

    Parameters
    ----------
    argv : list of str or None
        Arguments without the program name; None: ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0, 1 if a run failed, 2 if a tree is not usable.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    envs = {label: child_environment(tree, args.env) for label, tree in trees.items()}
    problems = [
        check_tree(label, tree, args.command[0], args.python, envs[label])
        for label, tree in trees.items()
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if trees["before"] == trees["after"]:
        print("note: --before and --after are the same tree")
    os.makedirs(args.logdir, exist_ok=True)
    print(f"command: {' '.join(args.command)}; logs in {args.logdir}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    times = {label: [] for label in trees}
    failed = {label: 0 for label in trees}
    runs = []
    for round_index in range(args.repeats):
        order = ["before", "after"]
        if args.abba and round_index % 2:
            order.reverse()
        for label in order:
            log_path = os.path.join(args.logdir, f"{label}-{round_index + 1}.log")
            seconds, returncode = run_once(
                trees[label], args.command, args.python, envs[label], log_path, args.timeout
            )
            status = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
            print(
                f"round {round_index + 1}/{args.repeats} {label:<6} {seconds:8.1f} s  "
                f"{status}  {log_path}",
                flush=True,
            )
            runs.append(
                dict(
                    tree=label,
                    round=round_index + 1,
                    seconds=seconds,
                    returncode=returncode,
                    log=log_path,
                )
            )
            if returncode == 0:
                times[label].append(seconds)
            else:
                failed[label] += 1
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    stats = summarize(trees, times, failed)
    summary = dict(
        trees=trees,
        command=args.command,
        python=args.python,
        env=args.env,
        runs=runs,
        stats=stats,
    )
    with open(os.path.join(args.logdir, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
