"""Batch norm kept training (``batchnorm="keep"``) against folded first ("fold"), on the base
of a side-by-side run, beside that run's fold rows and tfmot's rows.

    python benchmarks/bench_batchnorm.py cifar --sparsity 0.75 --clusters 4

Reads the base weights and training data that ``bench_vs_tfmot.py`` with the same arguments
saved (run it first), trains our deployment tree with batchnorm="keep" on the leaves that
setting changes (QAT nodes on a batch-norm model, per-channel clustering) with the same data,
rates, epochs and seeds, and evaluates the files the same way. "prune → PTQ" does not depend
on the setting: it is the control that the base and the prune node were reproduced.
"""

from __future__ import annotations

import argparse
import json
import time

import keras
from _common import RESULTS, ROOT, md_table, save_json, write_section
from bench_vs_tfmot import _verdict, load_saved_base, our_tree, run_name, targets_met, workload

CHANGED = ["prune → PTQ", "QAT", "PQAT", "cluster(pc) → PTQ", "CQAT(pc)",
           "prune → cluster(pc) → PTQ", "PCQAT(pc)"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["mnist", "kws", "cifar"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--clusters", type=int)
    args = parser.parse_args()
    if (args.sparsity is None) != (args.clusters is None):
        parser.error("--sparsity and --clusters go together")
    name = run_name(args.workload, args.sparsity, args.clusters, args.quick)
    work, results = ROOT / "benchmarks" / "results" / "runs" / name, RESULTS / f"{name}.json"
    if not (work / "data.npz").exists() or not results.exists():
        raise SystemExit(f"{work / 'data.npz'} or {results} is missing: run "
                         f"benchmarks/bench_vs_tfmot.py with the same arguments first")
    side_by_side = json.loads(results.read_text())
    w = workload(args.workload, args.quick, args.sparsity, args.clusters)
    keras.utils.set_random_seed(0)
    base = load_saved_base(work, w)

    start = time.perf_counter()
    keep = {r["path"]: r for r in our_tree(base, w, batchnorm="keep").explore(
        work / "ours_bn_keep", paths=CHANGED, force=True).rows}
    seconds = time.perf_counter() - start
    rows, data = [], {}
    for leaf in CHANGED:
        k, f, t = keep[leaf], side_by_side[leaf]["ours"], side_by_side[leaf]["tfmot"]
        verdict = targets_met(leaf, k, t, w["clusters"])
        data[leaf] = {"keep": k, "fold": f, "tfmot": t, "targets": verdict}
        rows.append([leaf, f"{f['int8_accuracy']:.2%}", f"{k['int8_accuracy']:.2%}",
                     f"{(k['int8_accuracy'] - f['int8_accuracy']) * 100:+.2f}",
                     f"{t['int8_accuracy']:.2%}" if t else "–",
                     f"{(k['int8_accuracy'] - t['int8_accuracy']) * 100:+.2f}" if t else "–",
                     f"{k['zip_bytes']:,} / {f['zip_bytes']:,}",
                     f"{k['sparsity']:.0%}", k["unique_per_channel_max"],
                     "yes" if k.get("verified") == "yes" else k.get("verified"),
                     _verdict(verdict.get("accuracy")) if t else "–"])
    save_json(f"batchnorm_{name}", data)
    write_section(
        f"batchnorm_{name}",
        f"Batch norm kept training vs folded first: {name.removeprefix('vs_tfmot_')}, "
        f"{w['sparsity']:.0%} sparsity, {w['clusters']} clusters",
        md_table(["leaf", "INT8 acc. fold", "INT8 acc. keep", "Δ keep − fold", "tfmot",
                  "Δ keep − tfmot", "zipped B keep / fold", "sparsity (keep)",
                  "unique / channel (keep)", "verified in file", "acc ≥ tfmot − 0.3 (keep)"],
                 rows)
        + f"\n\nSame base weights, data, rates, epochs and seeds as the side-by-side run "
          f"`{name}` (its fold and tfmot rows are read from benchmarks/results/{name}.json); "
          "only batchnorm=\"keep\" differs: batch norm trains on batch statistics in the QAT "
          "and per-channel cluster nodes, and the converter folds it into the per-channel "
          "int8 weights. \"prune → PTQ\" does not depend on it (control: equal to the fold "
          f"run when the base and the prune node were reproduced). Wall time {seconds:.0f}s.")


if __name__ == "__main__":
    main()
