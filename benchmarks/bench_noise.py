"""Seed noise: how much a leaf's int8 accuracy moves with the fine-tuning seed alone, in
collabopt and in tfmot, on the base of a side-by-side run. It says which accuracy gaps in the
side-by-side tables (one seed each) are method differences and which are shuffling luck.

    python benchmarks/bench_noise.py kws --seeds 0 1 2 --leaves "prune → PTQ" PQAT

Reads the base weights and training data that ``bench_vs_tfmot.py`` with the same
``--sparsity/--clusters`` saved (run it first); trains the requested leaves once per seed in
each system (same data, rates, epochs; ours with the library defaults: every node reseeded,
batch norm kept where it folds exactly, bias correction of folded cluster nodes unless
``--bias-correction off``) and evaluates the files identically. tfmot's files for a seed
are trained once per run folder and reused by later invocations (they do not depend on
ours).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import RESULTS, ROOT, md_table, save_json, write_section
from bench_step_time import ensure_tfmot_env
from bench_vs_tfmot import (
    LEAVES,
    _slug,
    load_saved_base,
    measure,
    our_tree,
    run_name,
    run_tfmot,
    workload,
)


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(ours: list[float], tfmot: list[float]) -> str:
    """Whether the mean difference exceeds twice its standard error (three seeds at least:
    two give no usable spread)."""
    if len(ours) < 3 or len(tfmot) < 3:
        return "–"
    (mo, so), (mt, st) = spread(ours), spread(tfmot)
    se = (so ** 2 / len(ours) + st ** 2 / len(tfmot)) ** 0.5
    if se == 0:
        return "identical" if mo == mt else ("ours higher" if mo > mt else "tfmot higher")
    if abs(mo - mt) <= 2 * se:
        return "within noise"
    return "ours higher" if mo > mt else "tfmot higher"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["mnist", "kws", "cifar"])
    parser.add_argument("--sparsity", type=float)
    parser.add_argument("--clusters", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--leaves", nargs="+", default=["prune → PTQ", "PQAT"],
                        choices=LEAVES, metavar="LEAF")
    parser.add_argument("--bias-correction", choices=["on", "off"], default="on",
                        help="ours: co.correct_bias after folded cluster nodes (default on)")
    args = parser.parse_args()
    if (args.sparsity is None) != (args.clusters is None):
        parser.error("--sparsity and --clusters go together")
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds needs at least two distinct seeds (three for a verdict)")
    name = run_name(args.workload, args.sparsity, args.clusters, quick=False)
    runs = ROOT / "benchmarks" / "results" / "runs"
    # either batch-norm variant of the side-by-side run: both save the same base and data
    work = next((runs / n for n in (name + "_bn_keep", name)
                 if (runs / n / "data.npz").exists()), None)
    if work is None:
        raise SystemExit(f"{runs / name}[_bn_keep]/data.npz is missing: run "
                         f"benchmarks/bench_vs_tfmot.py {args.workload} with the same "
                         "--sparsity/--clusters first")
    w = workload(args.workload, False, args.sparsity, args.clusters)
    base = load_saved_base(work, w)
    suffix = "" if args.bias_correction == "on" else "_no_bc"

    ours = {leaf: [] for leaf in args.leaves}
    tfmot = {leaf: [] for leaf in args.leaves}
    python = ensure_tfmot_env()
    seconds = {"ours": 0.0, "tfmot": 0.0}
    for seed in args.seeds:
        start = time.perf_counter()
        rows = our_tree(base, w, batchnorm="keep", seed=seed,
                        bias_correction=args.bias_correction == "on").explore(
            work / f"noise_ours{suffix}_seed{seed}", paths=args.leaves, force=True).rows
        seconds["ours"] += time.perf_counter() - start
        for row in rows:
            ours[row["path"]].append(row["int8_accuracy"])
        start = time.perf_counter()
        folder = f"noise_tfmot_seed{seed}"
        files = [work / folder / f"{_slug(leaf)}.tflite" for leaf in args.leaves]
        if all(f.exists() for f in files):
            print(f"seed {seed}: reusing tfmot's files in {work / folder}", flush=True)
        else:
            run = run_tfmot(python, work, w, "--seed", str(seed), "--leaves",
                            ",".join(args.leaves), "--out", folder)
            if run.returncode:
                raise SystemExit(f"tfmot failed for seed {seed}:\n{run.stderr[-3000:]}")
        seconds["tfmot"] += time.perf_counter() - start
        for leaf in args.leaves:
            tfmot[leaf].append(measure(work / folder / f"{_slug(leaf)}.tflite", w["xt"],
                                       w["yt"])["int8_accuracy"])
        print(f"seed {seed}: ours {[ours[k][-1] for k in args.leaves]}, "
              f"tfmot {[tfmot[k][-1] for k in args.leaves]}", flush=True)

    table, data = [], {}
    for leaf in args.leaves:
        (mo, so), (mt, st) = spread(ours[leaf]), spread(tfmot[leaf])
        data[leaf] = {"seeds": args.seeds, "ours": ours[leaf], "tfmot": tfmot[leaf],
                      "verdict": verdict(ours[leaf], tfmot[leaf])}
        table.append([leaf, " / ".join(f"{v:.2%}" for v in ours[leaf]),
                      " / ".join(f"{v:.2%}" for v in tfmot[leaf]),
                      f"{mo:.2%} ± {so * 100:.2f}", f"{mt:.2%} ± {st * 100:.2f}",
                      f"{(mo - mt) * 100:+.2f}", data[leaf]["verdict"],
                      "met" if mo >= mt - 0.003 else "NOT met"])
    section = f"noise_{name}{suffix}"
    save_json(section, data)
    seeds = ", ".join(map(str, args.seeds))
    write_section(
        section,
        f"Seed noise: {name.removeprefix('vs_tfmot_')}, {w['sparsity']:.0%} sparsity, "
        f"{w['clusters']} clusters"
        + (", ours without bias correction" if suffix else ""),
        md_table(["leaf", f"ours, seeds {seeds}", f"tfmot, seeds {seeds}", "ours mean ± sd",
                  "tfmot mean ± sd", "Δ means (pts)", "difference",
                  "mean ≥ tfmot mean − 0.3"], table)
        + f"\n\nSame base weights and data as the side-by-side run `{work.name}`; only the "
          "fine-tuning seed changes (ours: `DeploymentTree(seed=)`, every node reseeded, batch "
          "norm kept where it folds exactly, "
          + ("no bias correction" if suffix else "bias correction after folded cluster nodes")
          + "; tfmot: `set_random_seed` before every fit). "
          "\"within noise\": the difference of the means is at most twice its standard error. "
          f"{len(w['yt'])} test samples: one sample is {100 / len(w['yt']):.2f} points. "
          f"Wall time: ours {seconds['ours']:.0f}s, tfmot {seconds['tfmot']:.0f}s (0 where "
          "its files of an earlier invocation were reused).")
    print((RESULTS / f"{section}.json").read_text()[:2000])


if __name__ == "__main__":
    main()
