"""A/B: the bench run against this checkout and earlier revisions built beside it, in one run.

    python benchmarks/ab.py REV [REV ...] [--passes 2] [--dsn DSN] -- BENCH-ARGS

Each REV (a commit, a tag) is checked out in a temporary git worktree and its extension built
there with this venv's Python; this checkout is side "HEAD" as it stands (build it first;
--no-head leaves it out, so that it may change meanwhile).
Every side runs its own `python -m pglistener.bench BENCH-ARGS` against one server (an
embedded one unless --dsn), passes interleaved (A B C A B C ...), so that the machine's drift
falls on every side alike. Printed: each target's median per side and pass, and the CPU per
notification of the drain paths. Speed on 2 shared cores moves with the machine; judge a
change by the ratios of one run, never by figures from two.

Example (the NOTIFY hot path against the release before, as issue 23 measured it):

    python benchmarks/ab.py cf6ce33 --passes 2 -- --scenario drain --scenario wal-drain \\
        --notifications 1000000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]

#: Figures printed beside the targets: (scenario, system, key).
CPU = [("drain", "raw", "cpu_reader_ns"),
       ("drain", "pglistener-for", "cpu_supervisor_ns"),
       ("drain", "pglistener-for", "cpu_reader_ns"),
       ("drain", "pglistener-for", "cpu_backend_ns"),
       ("wal-drain", "raw-wal", "cpu_reader_ns"),
       ("wal-drain", "pglistener-wal-for", "cpu_supervisor_ns"),
       ("wal-drain", "pglistener-wal-for", "cpu_reader_ns"),
       ("wal-drain", "raw-wal", "cpu_backend_ns"),
       ("wal-drain", "pglistener-wal-for", "cpu_backend_ns"),
       ("wal-tx", "raw-wal", "cpu_reader_ns"),
       ("wal-tx", "pglistener-wal-for", "cpu_supervisor_ns"),
       ("wal-tx", "pglistener-wal-for", "cpu_reader_ns"),
       ("changes-drain", "raw-changes", "cpu_backend_ns"),
       ("changes-drain", "pglistener-changes-for", "cpu_backend_ns"),
       ("changes-drain", "pglistener-changes-for", "cpu_supervisor_ns"),
       ("changes-drain", "pglistener-changes-for", "cpu_reader_ns")]


def main() -> int:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("revs", nargs="*", help="revisions to build beside this checkout")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--dsn")
    p.add_argument("--keep", action="store_true", help="keep the worktrees and the JSON")
    p.add_argument("--no-head", action="store_true",
                   help="only the revisions, not this checkout (which may then change)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="pglistener-ab-"))
        if not args.keep:
            stack.callback(shutil.rmtree, work, True)
        sides = {} if args.no_head else {"HEAD": HERE}
        for rev in args.revs:
            tree = work / rev
            subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree),
                            rev], check=True, capture_output=True)
            if not args.keep:
                stack.callback(subprocess.run, ["git", "-C", str(HERE), "worktree", "remove",
                                                "--force", str(tree)], capture_output=True)
            print(f"building {rev} in {tree}", file=sys.stderr)
            subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                           cwd=tree, check=True, capture_output=True)
            sides[rev] = tree
        dsn = args.dsn
        if dsn is None:
            sys.path.insert(0, str(HERE))
            from pglistener.bench.pg import start_server

            print("starting an embedded PostgreSQL (pgserver)...", file=sys.stderr)
            dsn = start_server(stack)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for n in range(args.passes):
            for side, tree in sides.items():
                out = work / f"{side}-{n}.json"
                print(f"pass {n + 1}/{args.passes}: {side}", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "pglistener.bench", "--dsn", dsn,
                                "--no-progress", "--json", str(out), *bench_args],
                               cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                               check=True, stdout=subprocess.DEVNULL)
                runs[side].append(json.loads(out.read_text()))
        report(runs)
        if args.keep:
            print(f"\nkept in {work}")
    return 0


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    sides = list(runs)
    print("\n== targets: median per pass, per side")
    names = list(dict.fromkeys(t["target"] for side in sides for run in runs[side]
                               for t in run["targets"]))
    width = max(len(n) for n in names) if names else 10
    print(f"{'':<{width}}  " + "  ".join(f"{s:>18}" for s in sides))
    for name in names:
        cells = []
        for side in sides:
            found = [t["median"] for run in runs[side] for t in run["targets"]
                     if t["target"] == name]
            cells.append(" ".join(f"{v:.2f}" for v in found) or "-")
        print(f"{name:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))
    print("\n== CPU ns per notification (median over every round of every pass)")
    for scenario, system, key in CPU:
        cells = []
        for side in sides:
            values = [r[key] for run in runs[side]
                      for r in run["results"].get(scenario, {}).get(system, [])
                      if r.get(key) is not None]
            cells.append(f"{statistics.median(values):.0f}" if values else "-")
        if all(c == "-" for c in cells):
            continue            # not run
        label = f"{scenario} {system} {key}"
        print(f"{label:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
