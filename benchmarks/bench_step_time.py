"""Training-step time of every wrapper relative to plain training of the same model, ours
and tfmot's (tf_keras, its own virtualenv benchmarks/tfmot_env), measured in one run with the
variants interleaved round by round (these machines are noisy).

    python benchmarks/bench_step_time.py [--quick] [--no-tfmot]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
from _common import ROOT, md_table, save_json, timed_fit, write_section

import collabopt as co
from collabopt import models

TFMOT_ENV = ROOT / "benchmarks" / "tfmot_env"
TFMOT_PACKAGES = ["tensorflow-cpu==2.21.*", "tf_keras==2.21.*",
                  "tensorflow-model-optimization==0.8.1"]


def ensure_tfmot_env() -> Path | None:
    python = TFMOT_ENV / "bin" / "python"
    if not python.exists():
        print("[bench] creating benchmarks/tfmot_env (tensorflow + tf_keras + tfmot 0.8.1)")
        subprocess.run([sys.executable, "-m", "venv", str(TFMOT_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TFMOT_PACKAGES],
                       check=True)
    return python


def variants(build):
    def prune():
        return co.prune(build(), 0.5, verbose=False)

    def pruned():
        return co.strip(prune())

    def cluster():
        return co.cluster(co.fold_batchnorm(build()), 16, verbose=False)

    def clustered():
        return co.strip(cluster())

    def pcqat():
        pc = co.cluster(co.fold_batchnorm(pruned()), 16, verbose=False)
        return co.quantize(co.strip(pc), verbose=False, batchnorm="fold")

    # QAT as the table was measured: batch norm folded first (bench_batchnorm.py measures
    # the default "keep", which trains batch norm as well)
    return {"plain": build, "prune": prune, "cluster": cluster,
            "QAT": lambda: co.quantize(build(), verbose=False, batchnorm="fold"),
            "PQAT": lambda: co.quantize(pruned(), verbose=False, batchnorm="fold"),
            "CQAT": lambda: co.quantize(clustered(), verbose=False, batchnorm="fold"),
            "PCQAT": pcqat}


def step_times(model, x, y, steps):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return timed_fit(keras, model, x, y, len(x) // steps)


def measure(arch: str, rounds: int, steps: int) -> dict:
    build, shape, classes = {"mnist_cnn": (models.mnist_cnn, (28, 28, 1), 10),
                             "ds_cnn_l": (lambda: models.ds_cnn("L"), (49, 10, 1), 12)}[arch]
    rng = np.random.default_rng(0)
    x = rng.random((64 * steps, *shape), dtype=np.float32)
    y = rng.integers(0, classes, 64 * steps)
    built = {name: make() for name, make in variants(build).items()}
    results = {name: [] for name in built}
    for _ in range(rounds):
        for name, model in built.items():
            results[name] += step_times(model, x, y, steps)[2:]  # skip tracing steps
    return {name: float(np.median(t)) * 1000 for name, t in results.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-tfmot", action="store_true")
    args = parser.parse_args()
    rounds, steps = (2, 12) if args.quick else (3, 30)
    data = {}
    for arch in ("mnist_cnn", "ds_cnn_l"):
        print(f"[bench] {arch}: ours")
        ours = measure(arch, rounds, steps)
        theirs = None
        if not args.no_tfmot:
            python = ensure_tfmot_env()
            print(f"[bench] {arch}: tfmot")
            run = subprocess.run([str(python), str(ROOT / "benchmarks" / "tfmot_step_time.py"),
                                  arch, str(rounds), str(steps)], capture_output=True,
                                 text=True)
            if run.returncode == 0:
                theirs = json.loads(run.stdout.strip().splitlines()[-1])
            else:
                print(run.stderr[-2000:])
        data[arch] = {"ours": ours, "tfmot": theirs}
    save_json("step_time", data)
    rows = []
    for arch, d in data.items():
        ours, theirs = d["ours"], (d["tfmot"] or {}).get("median_ms", {})
        for name, ms in ours.items():
            t = theirs.get(name)
            t_ratio = (f"{t / theirs['plain']:.2f}x" if isinstance(t, float)
                       and isinstance(theirs.get("plain"), float) else (t or "–"))
            t_ms = f"{t:.1f}" if isinstance(t, float) else "–"
            rows.append([arch, name, f"{ms:.1f}", f"{ms / ours['plain']:.2f}x", t_ms, t_ratio])
    tfmot_version = next((d["tfmot"]["tfmot"] for d in data.values() if d["tfmot"]), "n/a")
    write_section("step_time", "Training step time relative to plain training", md_table(
        ["model", "variant", "ours ms/step", "ours / plain", "tfmot ms/step", "tfmot / plain"],
        rows) + f"\n\nBatch 64, median over {rounds} interleaved rounds of {steps} steps "
        f"(first 2 steps of each round skipped). tfmot {tfmot_version} on tf_keras in "
        "benchmarks/tfmot_env, same architectures. Targets: prune <= 1.3x, cluster <= 1.4x, "
        "PCQAT <= 1.6x. Our QAT variants fold batch norm first (QAT trains the folded "
        "weights), so 'plain' with batch norm is a slightly heavier baseline than the folded "
        "graph they train.")


if __name__ == "__main__":
    main()
