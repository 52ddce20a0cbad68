"""Wall time of the demo tree, sequential vs N local worker processes, and the depth bound.

    python benchmarks/bench_parallel.py [--workers 2] [--full] [--out runs/bench_parallel]

Both runs explore the same tree from the same base (the `collabopt demo --quick` settings:
MNIST, 6,000 training images, one fine-tuning epoch per node, per-channel branches: 11 trained
nodes, 12 leaves; `--full`: the `collabopt demo` settings, 60,000 images, two epochs).
The estimate for N workers replays the sequential run's node times on N workers (a node
starts when its parent is done and a worker is free), plus the leaf time, which the explorer
always spends in its own process. Writes the table into docs/distributed.md between its
BENCH markers.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "distributed.md"


def _tree(base, data, epochs):
    import keras

    import collabopt as co

    (x, y), (xt, yt) = data
    return co.DeploymentTree(
        base, (x, y), (xt, yt),
        compile={"optimizer": keras.optimizers.Adam(3e-4),
                 "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 "metrics": ["accuracy"]},
        fit={"epochs": epochs, "batch_size": 64, "verbose": 0}, per_channel=True,
        targets=co.Targets(max_accuracy_drop=0.01))


def _explore(tree, out: Path, executor=None) -> tuple[float, dict[str, float], list[str]]:
    messages: list[str] = []
    start = time.perf_counter()
    result = tree.explore(out, executor=executor, log=messages.append)
    wall = time.perf_counter() - start
    seconds = {m.group(1): float(m.group(2)) for m in
               (re.match(r"\[tree\] (\w+): trained in ([\d.]+)s", line) for line in messages)
               if m}
    assert not result.failed, result.failed
    return wall, seconds, [r["path"] for r in result.rows]


def simulate(tree, seconds: dict[str, float], workers: int) -> float:
    """Node-training wall time of a greedy list schedule on ``workers`` workers."""
    parent = {n.name: n.parent for n in tree.nodes if n.parent}
    done = {"base": 0.0}
    free = [0.0] * workers
    pending = [n for n in parent if n in seconds]
    while pending:
        ready = [n for n in pending if parent[n] in done]
        node = min(ready, key=lambda n: done[parent[n]])  # in the explorer's order
        pending.remove(node)
        w = min(range(workers), key=free.__getitem__)
        start = max(free[w], done[parent[node]])
        done[node] = free[w] = start + seconds[node]
    return max(done.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_parallel")
    ap.add_argument("--full", action="store_true", help="60,000 images, 2 epochs per node")
    ap.add_argument("--no-write", action="store_true", help="print, leave the doc alone")
    args = ap.parse_args(argv)
    import keras

    from collabopt import datasets, models, parallel

    (x, y), (xt, yt) = datasets.mnist()
    n, epochs = (len(x), 2) if args.full else (6000, 1)
    data = (x[:n], y[:n]), (xt[:1000], yt[:1000])
    keras.utils.set_random_seed(0)
    base = models.mnist_cnn((28, 28, 1))
    base.compile(keras.optimizers.Adam(1e-3),
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    base.fit(*data[0], epochs=3 if args.full else 2, batch_size=64, verbose=0)
    shutil.rmtree(args.out, ignore_errors=True)
    seq_wall, seq_nodes, seq_leaves = _explore(_tree(base, data, epochs), args.out / "sequential")
    with parallel.local_executor(args.workers) as pool:
        par_wall, par_nodes, par_leaves = _explore(_tree(base, data, epochs), args.out / "parallel",
                                                   pool)
    assert seq_leaves == par_leaves
    tree = _tree(base, data, epochs)
    train = sum(seq_nodes.values())
    leaves = seq_wall - train  # export, evaluation, latency, report
    rows = [f"| sequential (measured) | {seq_wall:.0f} | {train:.0f} |",
            f"| {args.workers} local workers (measured) | {par_wall:.0f} | "
            f"{par_wall - leaves:.0f} (incl. a process start per node) |"]
    for n in (1, 2, 4, 8, 11):
        est = simulate(tree, seq_nodes, n)
        rows.append(f"| {n} worker{'s' if n > 1 else ''}, one per machine (estimate) | "
                    f"{est + leaves:.0f} | {est:.0f} |")
    depth = simulate(tree, seq_nodes, len(seq_nodes))  # a worker per node: the chains
    table = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on this machine ({os.cpu_count()} cores), "
        f"`python benchmarks/bench_parallel.py --workers {args.workers}"
        f"{' --full' if args.full else ''}`; node times of the "
        f"sequential run: {', '.join(f'{k} {v:.0f}s' for k, v in seq_nodes.items())}.",
        "", "| run | wall time (s) | of it, training nodes (s) |", "|---|---|---|", *rows, "",
        f"Leaves (export, evaluation, latency, report) took {leaves:.0f} s in both, in the "
        f"explorer's own process. The longest parent -> child chain of fine-tunes is "
        f"{depth:.0f} s: with one worker per node, that is the training part of the wall "
        "time."])
    print(table)
    if not args.no_write:
        from _common import replace_marked

        replace_marked(DOC, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
