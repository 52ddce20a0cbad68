"""Conversion fidelity of a spoken-digit tree run, on all 3,000 clips.

The official test split has 300 clips: one clip is 0.33 points, so "file within 0.3 points of
its Keras model" can only be judged as "no clip changed". Conversion fidelity does not need
unseen data, so this compares each leaf's file with the exact Keras model it was exported from
on every clip of the data set (training clips included), where one clip is 0.03 points.

    python benchmarks/bench_fidelity.py kws-official_split-aggressive

Reads the run directory written by ``bench_tree.py kws`` (benchmarks/results/runs/NAME):
node models from ``nodes/``, the base model from ``base.keras``, leaves from ``leaves/``.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np
from _common import ROOT, md_table, save_json, write_section

import collabopt as co
from collabopt import datasets


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", help="a bench_tree.py kws run under benchmarks/results/runs")
    args = parser.parse_args()
    run = ROOT / "benchmarks" / "results" / "runs" / args.run
    if not (run / "leaves").is_dir():
        parser.error(f"{run} holds no tree run: run benchmarks/bench_tree.py kws first")
    holdout = "theo" if "theo" in args.run else None
    (x, y), (xt, yt) = datasets.speech_digits(holdout_speaker=holdout)
    x_all, y_all = np.concatenate([x, xt]), np.concatenate([y, yt])
    rows, data = [], {}
    for leaf in sorted((run / "leaves").glob("*.json")):
        r = json.loads(leaf.read_text())
        if "node" not in r:  # the FP32 reference
            continue
        source = run / ("base.keras" if r["node"] == "base" else f"nodes/{r['node']}.keras")
        if not source.exists():
            print(f"[bench] {r['path']}: {source.name} not stored by this run, skipped")
            continue
        keras_pred = keras.models.load_model(source).predict(
            x_all, batch_size=256, verbose=0).argmax(1)
        file_pred = co.predict_tflite(r["file"], x_all).argmax(1)
        d = {"path": r["path"], "level": r["level"],
             "keras_accuracy": float(np.mean(keras_pred == y_all)),
             "file_accuracy": float(np.mean(file_pred == y_all)),
             "changed": int(np.sum(keras_pred != file_pred))}
        data[r["path"]] = d
        print(f"[bench] {r['path']}: {d['changed']} of {len(x_all)} clips changed class")
    ordered = sorted(data.values(), key=lambda d: d["level"])
    for d in ordered:
        delta = (d["file_accuracy"] - d["keras_accuracy"]) * 100
        rows.append([d["path"], "QAT" if "QAT" in d["path"] else "PTQ",
                     f"{d['keras_accuracy']:.2%}", f"{d['file_accuracy']:.2%}",
                     f"{delta:+.2f}", f"{d['changed']} of {len(x_all):,}",
                     "yes" if abs(delta) <= 0.3 + 1e-9 else "no"])
    save_json(f"fidelity_{args.run}", data)
    write_section(f"fidelity_{args.run}", f"Conversion fidelity on all clips: {args.run}",
                  md_table(["path", "export", "Keras (exported model)", "INT8 file",
                            "file − Keras (pts)", "clips whose class changed",
                            "within 0.3 pts"], rows)
                  + f"\n\nAll {len(x_all):,} clips of the data set (training clips included: "
                  "conversion fidelity needs no unseen data, and the 300-clip test split "
                  "cannot resolve 0.3 points). 'Keras (exported model)' is the model the file "
                  "was converted from: the QAT model for QAT leaves, the float model for PTQ "
                  "leaves (so their gap is post-training quantization error).")


if __name__ == "__main__":
    main()
