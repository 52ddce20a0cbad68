"""Accuracy and size of every leaf of the deployment tree, on real data, for a standard and
an aggressive setting. Workloads: the MNIST CNN (full MNIST, both settings) and DS-CNN-L on
spoken digits with one speaker held out (aggressive setting: the official split is solved).

    python benchmarks/bench_tree.py mnist [--quick]
    python benchmarks/bench_tree.py kws [--quick] [--split official]

The KWS default holds speaker 'theo' out (train on five speakers, test on the sixth);
``--split official`` runs the dataset's own split into a section of its own.
"""

from __future__ import annotations

import argparse
import shutil
import time

import keras
from _common import ROOT, md_table, save_json, write_section

import collabopt as co
from collabopt import datasets, models


def _compile(lr):
    def fn(model):
        model.compile(keras.optimizers.Adam(lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
    return fn


def train_base(build, train, epochs, lr=1e-3, batch_size=64, seed=0):
    keras.utils.set_random_seed(seed)
    model = build()
    _compile(lr)(model)
    model.fit(*train, epochs=epochs, batch_size=batch_size, verbose=2)
    return model


def run_tree(name, base, train, val, sparsity, clusters, epochs, lr, qat_lr, out):
    tree = co.DeploymentTree(base, train, val, compile=_compile(lr), qat_compile=_compile(qat_lr),
                             fit={"epochs": epochs, "batch_size": 64, "verbose": 0},
                             sparsity=sparsity, clusters=clusters, per_channel=True,
                             # the setting these tables were measured with; the library
                             # default "keep" is measured against it by bench_batchnorm.py
                             latency_runs=30, batchnorm="fold",
                             seed=None)  # one stream seeded by train_base, as measured
    start = time.perf_counter()
    shutil.rmtree(out / name, ignore_errors=True)  # measure this code, never reuse old nodes
    result = tree.explore(out / name)
    seconds = time.perf_counter() - start
    base.save(out / name / "base.keras")  # the PTQ leaf's source, for bench_fidelity.py
    return result, seconds


def table(result) -> str:
    base = result.baseline
    ptq = next(r for r in result.rows if r["path"] == "PTQ")
    rows = []
    for r in result.rows:
        rows.append([r["path"], f"{r['fp32_accuracy']:.2%}", f"{r['keras_accuracy']:.2%}",
                     f"{r['int8_accuracy']:.2%}",
                     f"{(r['int8_accuracy'] - r['keras_accuracy']) * 100:+.2f}",
                     f"{r['agreement']:.2%}" if r.get("agreement") is not None else "–",
                     f"{(r['int8_accuracy'] - ptq['int8_accuracy']) * 100:+.2f}",
                     f"{r['size_bytes']:,} → {r['zip_bytes']:,} ({r['zip_reduction']:.0%})",
                     f"{r['entropy_bound_bytes']:,}", f"{r['sparsity']:.0%}",
                     f"{r['unique_max']} / {r['unique_per_channel_max']}",
                     f"{r['vela_encoded_bytes']:,}" if r["vela_encoded_bytes"] else "–",
                     f"{r['vela_cycles']:,}" if r["vela_cycles"] else "–", r["verified"]])
    head = ["path", "FP32 parent", "Keras (exported model)", "INT8 file", "file − Keras (pts)",
            "same class as Keras", "vs PTQ (pts)", "bytes → zipped (reduction)",
            "entropy bound (B)", "sparsity", "unique tensor / channel", "Vela weights (B)",
            "Vela cycles", "verified"]
    return (f"FP32 baseline: {base['fp32_accuracy']:.2%}, {base['size_bytes']:,} bytes → "
            f"{base['zip_bytes']:,} zipped.\n\n" + md_table(head, rows))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["mnist", "kws"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--split", choices=["holdout", "official"], default="holdout",
                        help="kws only: speaker 'theo' held out (default) or the official split")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "runs"
    sections, data = [], {}
    if args.workload == "mnist":
        (x, y), (xt, yt) = datasets.mnist()
        if args.quick:
            x, y, xt, yt = x[:6000], y[:6000], xt[:2000], yt[:2000]
        base_epochs, ft = (2, 1) if args.quick else (3, 2)
        base = train_base(models.mnist_cnn, (x, y), base_epochs)
        settings = [("standard", 0.5, 16), ("aggressive", 0.8, 8)]
        splits = {"MNIST": ((x, y), (xt, yt), base)}
        lr = qat_lr = 3e-4
    else:
        # The official split is solved by DS-CNN-L (100 %, measured with tfmot), so the
        # methods are told apart on a speaker held out, at the aggressive setting.
        splits = {}
        base_epochs, ft = (8, 1) if args.quick else (20, 4)  # 40 steps an epoch
        split_plan = ((("official split", None),) if args.split == "official" else
                      (("speaker 'theo' held out", "theo"),))
        for split, holdout in split_plan:
            (x, y), (xt, yt) = datasets.speech_digits(holdout_speaker=holdout)
            base = train_base(lambda: models.ds_cnn("L", classes=10), (x, y), base_epochs)
            splits[split] = ((x, y), (xt, yt), base)
        settings = [("aggressive", 0.75, 4)]
        # The base reaches ~0 training loss: fine-tuning it at 3e-4 moved the unseen
        # speaker's accuracy by 5 points with no compression at all, so gentler rates here.
        lr, qat_lr = 1e-4, 1e-5
    for split, (train, val, base) in splits.items():
        for setting, sparsity, clusters in settings:
            key = f"{args.workload}-{split}-{setting}".replace(" ", "_").replace("'", "")
            print(f"[bench] {key}: sparsity {sparsity}, {clusters} clusters")
            result, seconds = run_tree(key, base, train, val, sparsity, clusters, ft, lr,
                                       qat_lr, out)
            data[key] = {"baseline": result.baseline, "rows": result.rows, "seconds": seconds}
            sections.append(f"### {split}, {setting}: {sparsity:.0%} sparsity, {clusters} "
                            f"clusters\n\n{table(result)}\n\nTree explored in {seconds:.0f}s.")
    section = f"tree_{args.workload}" + ("_official" if args.split == "official" else "")
    save_json(f"{section}{'_quick' if args.quick else ''}", data)
    what = ("MNIST CNN on MNIST (60,000 / 10,000)" if args.workload == "mnist" else
            "DS-CNN-L on spoken digits (49x10 MFCC, standardized)")
    write_section(section, f"Deployment tree: {what}",
                  f"Base model trained {base_epochs} epochs (Adam 1e-3, batch 64, seed 0); every "
                  f"node fine-tuned {ft} epoch(s) at Adam {lr:g} (QAT nodes at {qat_lr:g}); "
                  "pruning ramps 0 → target over the first 2/3 of the fine-tune (polynomial "
                  "decay) on the model with batch norm; clustering per tensor on the "
                  "batch-norm-folded model (kmeans++), per channel for the (pc) rows; QAT leaves "
                  "export their learned ranges, PTQ leaves calibrate on 300 training samples. "
                  "'Keras (exported model)' is the accuracy of the exact model that was "
                  "converted (the QAT model for QAT leaves), so 'file − Keras' is the "
                  "conversion error; 'same class as Keras' is the share of test samples on "
                  "which file and Keras model predict the same class (flips in both "
                  "directions cancel in an accuracy difference, not here). Zipped: deflate. "
                  "Vela: ethos-u55-128.\n\n"
                  + "\n\n".join(sections))


if __name__ == "__main__":
    main()
