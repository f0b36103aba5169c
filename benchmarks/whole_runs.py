"""Whole training runs of one experiment, variants alternated: steps/s, wall time, peak memory.

    python -m benchmarks.whole_runs --experiment mnist_cnn \\
        --args "--dataset synthetic --synthetic-size 60000 --parallel none --epochs 1" \\
        --variants "auto=;single=--steps-per-call 1" --rounds 3

Each run is a fresh process, started as a user would start it:
``python -m experiments.<experiment> <args> <variant's args> --workdir <temp>
--progress none``, plus ``--compilation-cache ''`` (every run compiles) unless the
arguments name a cache. In each round the variants run one after another, so a
slow phase of a shared machine falls on all of them; each variant's figures are
divided by the first variant's of the same round, and the table gives the median
and range of those ratios over the rounds.

Per run: the loop's steady training steps/s and wall seconds (``summary.json``),
the process's wall seconds and peak resident memory (``wait4``), test loss and
accuracy, and ``steps_per_call`` and ``num_devices`` as the run resolved them.

``--revisions A,B`` compares code instead of flags: every variant runs under each
git revision (a detached ``git worktree`` each, removed afterwards; ``worktree``
is this checkout as it is, uncommitted changes included), named ``variant @ rev``,
the first revision's first variant the baseline:

    python -m benchmarks.whole_runs --experiment mnist_cnn --revisions HEAD~1,worktree \
        --args "--dataset synthetic --epochs 1 --num-seeds 4" --variants "default="
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks import common


def parse_variants(text: str) -> list[tuple[str, list[str]]]:
    """``"name=args;name2=args"`` -> ``[(name, argv), ...]`` (args may be empty)."""
    variants = []
    for item in (v.strip() for v in text.split(";")):
        if not item:
            continue
        name, sep, rest = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--variants: {item!r} is not NAME=ARGS (e.g. 'single=--steps-per-call 1')")
        variants.append((name.strip(), shlex.split(rest)))
    names = [n for n, _ in variants]
    if not variants or len(set(names)) != len(names):
        raise ValueError(f"--variants needs one or more distinct names, got {names}")
    return variants


def run_command(experiment: str, argv: list[str], workdir: str) -> list[str]:
    """The child's command line for one run."""
    cmd = [sys.executable, "-m", f"experiments.{experiment}", *argv,
           "--workdir", workdir, "--progress", "none"]
    if not any(a == "--compilation-cache" or a.startswith("--compilation-cache=") for a in argv):
        cmd += ["--compilation-cache", ""]
    return cmd


def run_once(experiment: str, argv: list[str], tree: str | None = None) -> dict[str, Any]:
    """One whole run in a fresh process; its summary figures, wall and peak memory.
    ``tree``: a source tree to run from (its ``experiments`` and ``jaxtrain``)."""
    env = None
    if tree:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [tree, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as root:
        workdir = os.path.join(root, "run")
        cmd = run_command(experiment, argv, workdir)
        with open(os.path.join(root, "output.txt"), "w+") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tree, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            process_s = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, for its rusage
            if proc.returncode != 0:
                log.seek(0)
                tail = log.read()[-2000:]
                raise common.BenchmarkError(
                    f"{shlex.join(cmd[1:])} exited with {proc.returncode}:\n{tail}")
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    return {
        "steps_per_s": summary["train_steps_per_sec"],
        "wall_s": summary["wall_seconds"],
        "process_s": process_s,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # kilobytes on Linux
        "test_loss": summary["test_loss"],
        "test_accuracy": summary["test_accuracy"],
        "steps": summary["steps"],
        "steps_per_call": summary.get("steps_per_call"),
        "num_devices": summary.get("num_devices"),
    }


def summarize(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Per variant: medians over rounds, and per round its figures over the first variant's
    (``steps_per_s`` ratio; ``speedup_*``: the first's seconds over this one's)."""
    first = {r["round"]: r for r in runs if r["variant"] == names[0]}
    out = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        pairs = [(r, first[r["round"]]) for r in mine if r["round"] in first]
        ratios = {  # None where a run has no steady steps (one call in all)
            "steps_per_s_vs_first": [common.ratio(r["steps_per_s"], f["steps_per_s"])
                                     for r, f in pairs],
            "speedup_wall_vs_first": [common.ratio(f["wall_s"], r["wall_s"]) for r, f in pairs],
            "speedup_process_vs_first": [common.ratio(f["process_s"], r["process_s"])
                                         for r, f in pairs],
        }
        row: dict[str, Any] = {"variant": name, "rounds": len(mine)}
        for key in ("steps_per_s", "wall_s", "process_s"):
            row[key + "_median"] = _median([r[key] for r in mine])
        row["peak_rss_bytes_max"] = max(r["peak_rss_bytes"] for r in mine)
        for key, values in ratios.items():
            row[key] = values
            row[key + "_median"] = _median(values)
        row["test_loss"] = sorted({r["test_loss"] for r in mine})
        row["steps_per_call"] = sorted({r["steps_per_call"] for r in mine}, key=str)
        row["num_devices"] = sorted({r["num_devices"] for r in mine}, key=str)
        out.append(row)
    return out


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v]
    return statistics.median(known) if known else None


def _range(values: list[float | None]) -> str:
    known = [v for v in values if v]
    return f"{min(known):.2f}-{max(known):.2f}" if known else "-"


WORKTREE = "worktree"  # --revisions: this checkout as it is


def _git(*argv: str) -> str:
    out = subprocess.run(["git", "-C", common.REPO_ROOT, *argv], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise ValueError(out.stderr.strip().splitlines()[-1] if out.stderr.strip()
                         else f"git {' '.join(argv)} failed")
    return out.stdout.strip()


def resolve_revisions(text: str) -> dict[str, str]:
    """``"A,B"`` -> ``{rev: commit}`` (``worktree``: itself); ValueError naming a bad one."""
    revs = [r.strip() for r in text.split(",") if r.strip()]
    if len(revs) < 2 or len(set(revs)) != len(revs):
        raise ValueError(f"--revisions needs two or more distinct revisions, got {revs}")
    out = {}
    for rev in revs:
        try:
            out[rev] = rev if rev == WORKTREE else _git("rev-parse", "--verify", f"{rev}^{{commit}}")
        except ValueError:
            raise ValueError(f"--revisions: {rev!r} is not a commit of this repository") from None
    return out


@contextlib.contextmanager
def checkouts(revisions: dict[str, str]):
    """``{rev: source tree}``: a detached worktree per commit, removed on exit."""
    root = tempfile.mkdtemp(prefix="whole_runs_")
    trees: dict[str, str] = {}
    try:
        for i, (rev, commit) in enumerate(revisions.items()):
            if commit == WORKTREE:
                trees[rev] = common.REPO_ROOT
                continue
            path = os.path.join(root, str(i))
            _git("worktree", "add", "--detach", path, commit)
            trees[rev] = path
        yield trees
    finally:  # best effort: a failed removal must not hide the run's own error
        for path in trees.values():
            if path != common.REPO_ROOT:
                with contextlib.suppress(ValueError):
                    _git("worktree", "remove", "--force", path)
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _git("worktree", "prune")


def parse_args(argv):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--experiment", default="digits_mlp",
                   help="experiments.<name> to run (default: digits_mlp)")
    p.add_argument("--args", default="", help="arguments every run gets (one string)")
    p.add_argument("--variants", default="auto=;single=--steps-per-call 1",
                   help="NAME=ARGS;NAME=ARGS: each variant's own arguments; the first is the "
                        "baseline of the ratios (default: 'auto=;single=--steps-per-call 1')")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant, alternated")
    p.add_argument("--revisions", default="",
                   help="REV,REV: run every variant under each git revision ('worktree': "
                        "this checkout with its changes); the first is the baseline")
    args = p.parse_args(argv)
    if importlib.util.find_spec(f"experiments.{args.experiment}") is None:
        p.error(f"--experiment: no module experiments.{args.experiment}")
    try:
        args.variant_list = parse_variants(args.variants)
    except ValueError as e:
        p.error(str(e))
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    args.revision_commits = {}
    if args.revisions:
        try:
            args.revision_commits = resolve_revisions(args.revisions)
        except ValueError as e:
            p.error(str(e))
    if args.smoke:
        args.experiment, args.args, args.rounds = "digits_mlp", "--epochs 2 --parallel none", 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    info = common.machine_info(args.note)
    with checkouts(args.revision_commits) as trees:
        runs = run_rounds(args, trees)
    if runs is None:
        return 1
    names = list(dict.fromkeys(r["variant"] for r in runs))
    summary = summarize(runs, names)
    common.print_table(
        f"experiments.{args.experiment} {args.args}: whole runs, {args.rounds} round(s), "
        f"variants alternated; ratios over '{names[0]}' in the same round (median, range)",
        ["variant", "K", "devices", "steps/s", "vs_first", "range", "wall_s", "speedup",
         "range", "process_s", "peak_rss_mib", "test_loss"],
        [[s["variant"], ",".join(map(str, s["steps_per_call"])),
          ",".join(map(str, s["num_devices"])), s["steps_per_s_median"],
          s["steps_per_s_vs_first_median"], _range(s["steps_per_s_vs_first"]), s["wall_s_median"],
          s["speedup_wall_vs_first_median"], _range(s["speedup_wall_vs_first"]),
          s["process_s_median"], common.mib(s["peak_rss_bytes_max"]),
          ",".join(f"{x:.6g}" for x in s["test_loss"])] for s in summary])
    common.write_results("whole_runs", args, info, {
        "experiment": args.experiment, "args": args.args, "variants": args.variants,
        "revisions": args.revision_commits, "rounds": args.rounds, "runs": runs,
        "summary": summary})
    return 0


def run_rounds(args, trees: dict[str, str]) -> list[dict[str, Any]] | None:
    """Every variant (under every revision of ``trees``, when given) once a round, in
    order; None after printing the error of a failed run."""
    shared = shlex.split(args.args)
    plan = [(name, own, None) for name, own in args.variant_list]
    if trees:
        plan = [(f"{name} @ {rev}", own, tree) for rev, tree in trees.items()
                for name, own in args.variant_list]
    runs = []
    for rnd in range(args.rounds):
        for name, own, tree in plan:
            print(f"... round {rnd + 1}/{args.rounds}: {name}", flush=True)
            try:
                result = run_once(args.experiment, shared + own, tree)
            except common.BenchmarkError as e:
                print(f"error: variant '{name}': {e}", file=sys.stderr)
                return None
            runs.append({"round": rnd, "variant": name, "args": shared + own, **result})
    return runs


if __name__ == "__main__":
    sys.exit(main())
