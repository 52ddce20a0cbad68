"""Distillation's gain per leaf at an aggressive setting, mean +- sd over seeds, on the
strongest stored base (ResNet-8 / CIFAR-10, benchmarks/bases/).

    python benchmarks/bench_distill.py --seeds 0 1 2 --train 10000 --epochs 2

Each seed explores the same leaves twice with ``co.DeploymentTree`` (identical data, rates,
epochs and seed), once plain and once with ``distill=True`` (the uncompressed base teaches
every fine-tune: temperature 4, weight 0.5), and evaluates the int8 files on the whole test
set. The fine-tunes see ``--train`` training images, spread evenly through the set, so the
run fits a CPU session; the gain is measured within one run, so the ratio is what counts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import ROOT, md_table, save_json, write_section

BASE = ROOT / "benchmarks" / "bases" / "resnet8_cifar10.keras"


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=10_000, help="training images per fine-tune")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--leaves", nargs="+", default=["PQAT", "PCQAT"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/collabopt_bench_distill"))
    args = ap.parse_args(argv)
    if not BASE.exists():
        raise SystemExit(f"{BASE} is missing: train it with benchmarks/bases/train_resnet8.py")

    import keras

    import collabopt as co
    from collabopt.tree import _sample

    (x, y), (xt, yt) = co.datasets.cifar10()
    train = _sample((x, y), args.train)
    base = keras.models.load_model(BASE)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results: dict[str, dict[str, list[float]]] = {"plain": {}, "distill": {}}
    base_acc = None
    start = time.perf_counter()
    for seed in args.seeds:
        for mode in ("plain", "distill"):
            tree = co.DeploymentTree(
                base, train, (xt, yt),
                compile={"optimizer": keras.optimizers.Adam(1e-4), "loss": loss},
                qat_compile={"optimizer": keras.optimizers.Adam(1e-5), "loss": loss},
                fit={"epochs": args.epochs, "batch_size": 64, "verbose": 2},
                sparsity=args.sparsity, clusters=args.clusters, seed=seed, latency_runs=3,
                vela_accelerator=None, distill=mode == "distill")
            result = tree.explore(args.work / f"{mode}_seed{seed}", paths=args.leaves,
                                  force=True)
            base_acc = result.baseline["fp32_metric"]
            for row in result.rows:
                results[mode].setdefault(row["path"], []).append(row["int8_metric"])
            print(f"seed {seed} {mode}: "
                  + ", ".join(f"{r['path']} {r['int8_metric']:.4f}" for r in result.rows),
                  flush=True)
    rows = []
    for leaf in args.leaves:
        plain, distilled = results["plain"][leaf], results["distill"][leaf]
        gains = [d - p for d, p in zip(distilled, plain, strict=True)]
        (pm, ps), (dm, ds), (gm, gs) = spread(plain), spread(distilled), spread(gains)
        rows.append([leaf, f"{pm:.2%} ± {ps:.2%}", f"{dm:.2%} ± {ds:.2%}",
                     f"{gm * 100:+.2f} ± {gs * 100:.2f}"])
    minutes = (time.perf_counter() - start) / 60
    body = (f"ResNet-8 base (test top-1 {base_acc:.2%}), {args.sparsity:.0%} sparsity / "
            f"{args.clusters} clusters, every fine-tune on {args.train:,} training images "
            f"spread evenly through the set, {args.epochs} epochs (Adam 1e-4, QAT 1e-5), "
            f"seeds {args.seeds}; int8 file top-1 on the 10,000 test images. Distillation: "
            "`distill=True` (temperature 4, weight 0.5), the uncompressed base as teacher of "
            "every node. Gain: distilled minus plain per seed (same seed, same data order), "
            f"mean ± sd. {minutes:.0f} min on this machine.\n\n"
            + md_table(["Leaf", "INT8 acc. plain", "INT8 acc. distilled",
                        "Gain (points)"], rows))
    save_json("distill", {"args": {k: str(v) for k, v in vars(args).items()},
                          "base": base_acc, "results": results})
    write_section("distill", "Distillation at the aggressive setting (ResNet-8 / CIFAR-10)",
                  body)
    print(body)


if __name__ == "__main__":
    main()
