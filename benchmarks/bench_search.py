"""Grid against search on one path (PCQAT): the smallest int8 file within one point of the
base that each finds, and what it cost, on the MNIST CNN (real MNIST).

    python benchmarks/bench_search.py --trials 12 --train 10000

The grid is ``DeploymentTree(sparsity=[0.5, 0.75, 0.875], clusters=[16, 8, 4])`` on its nine
PCQAT leaves (3 prune, 9 cluster and 9 QAT nodes: prune and cluster nodes are shared). The
search is ``tree.search(co.Search(leaf="PCQAT", trials=..., sparsity=(0.5, 0.875),
clusters=(4, 16), per_layer=True))``: the same ranges, plus, per layer, whether pruning and
clustering touch it (3 nodes per trial). Same base, data, rates, epochs and seed; every file
is measured by the tree (int8 top-1 on the 10,000 test images, zipped bytes, verified).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import md_table, save_json, write_section

SPARSITY, CLUSTERS, DROP = [0.5, 0.75, 0.875], [16, 8, 4], 0.01


def smallest(rows: list[dict]) -> dict | None:
    ok = [r for r in rows if r["meets_targets"]]
    return min(ok, key=lambda r: r["zip_bytes"]) if ok else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/collabopt_bench_search"))
    args = ap.parse_args(argv)

    import keras

    import collabopt as co
    from collabopt.tree import _sample, leaf_names

    (x, y), (xt, yt) = co.datasets.mnist()
    train = _sample((x, y), args.train)
    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base = co.models.mnist_cnn()
    base.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    base.fit(*_sample((x, y), 20_000), epochs=3, batch_size=64, verbose=2)

    def tree(**settings):
        return co.DeploymentTree(
            base, train, (xt, yt),
            compile={"optimizer": keras.optimizers.Adam(1e-4), "loss": loss},
            qat_compile={"optimizer": keras.optimizers.Adam(1e-5), "loss": loss},
            fit={"epochs": args.epochs, "batch_size": 64, "verbose": 0}, latency_runs=1,
            vela_accelerator=None, targets=co.Targets(max_metric_drop=DROP), **settings)

    start = time.perf_counter()
    grid = tree(sparsity=SPARSITY, clusters=CLUSTERS).explore(
        args.work / "grid", force=True, paths=[
            n for n in leaf_names(False, SPARSITY, CLUSTERS) if n.startswith("PCQAT")])
    grid_min = (time.perf_counter() - start) / 60
    start = time.perf_counter()
    found = tree().search(args.work / "search", co.Search(
        leaf="PCQAT", trials=args.trials, sparsity=(SPARSITY[0], SPARSITY[-1]),
        clusters=(min(CLUSTERS), max(CLUSTERS)), per_layer=True, sampler=args.sampler),
        force=True)
    search_min = (time.perf_counter() - start) / 60

    base_acc = grid.baseline["fp32_metric"]
    rows = []
    for name, leaves, nodes, minutes in (
            ("grid (3 sparsities x 3 counts)", grid.rows, 3 + 9 + 9, grid_min),
            (f"search ({args.sampler}, per layer)", found.trials, 3 * len(found.trials),
             search_min)):
        best = smallest(leaves)
        if best is not None and "settings" in best:
            s = best["settings"]
            setting = (f"{s['sparsity']:.0%}, k{s['clusters']}, dense: "
                       f"{', '.join(s['dense_layers']) or 'none'}")
        else:
            setting = best["path"] if best else "–"
        rows.append([name, len(leaves), nodes, f"{minutes:.1f}",
                     f"{sum(r['meets_targets'] for r in leaves)}",
                     f"{best['zip_bytes']:,}" if best else "none",
                     f"{best['int8_metric']:.2%}" if best else "–", setting])
    save_json("search", {"base_accuracy": base_acc, "grid": grid.rows, "search": found.trials,
                         "args": {k: str(v) for k, v in vars(args).items()}})
    body = (f"MNIST CNN base: {base_acc:.2%} test top-1 (3 epochs on 20,000 images). Every "
            f"fine-tune: {args.train:,} training images, {args.epochs} epoch(s), batch 64, "
            "Adam 1e-4 (QAT 1e-5), seed 0; target: int8 top-1 at most 1 point below the base."
            "\n\n" + md_table(["method", "leaves / trials", "nodes trained", "minutes",
                               "within 1 point", "smallest zip within 1 point (B)",
                               "its int8 top-1", "its settings"], rows)
            + f"\n\nThe search asked {args.trials} trials; {len(found.failed)} left every layer "
            "out of pruning or clustering (each layer's yes/no is drawn alone, and this model "
            "has three) and were failed at once, untrained.")
    write_section("search", "Grid vs search on the PCQAT path (MNIST CNN)", body)
    print(body)


if __name__ == "__main__":
    main()
