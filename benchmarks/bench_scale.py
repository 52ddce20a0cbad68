"""Wrapper overhead at scale: peak memory and step time of clustering (64 clusters, per
tensor) against plain training, on ResNet-50 (25.6 M weights). Each variant runs in its own
process so that peak RSS is its own.

    python benchmarks/bench_scale.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import md_table, save_json, timed_fit, write_section


def child(variant: str, steps: int, size: int, batch: int) -> None:
    import keras
    import numpy as np

    import collabopt as co

    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3),
                                        classes=1000)
    weights = model.count_params()
    start = time.perf_counter()
    if variant == "cluster64":
        model = co.cluster(co.fold_batchnorm(model), 64, verbose=False)
    elif variant == "prune":
        model = co.prune(model, 0.5, verbose=False)
    wrap_seconds = time.perf_counter() - start
    model.compile(keras.optimizers.Adam(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((batch * steps, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 1000, batch * steps)
    times = timed_fit(keras, model, x, y, batch)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "weights": weights, "peak_mb": peak_kb / 1024,
                      "ms_per_step": float(np.median(times[2:])) * 1000,
                      "wrap_seconds": wrap_seconds}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        variant, steps, size, batch = args.child
        child(variant, int(steps), int(size), int(batch))
        return
    steps, size, batch = (5, 64, 8) if args.quick else (8, 128, 16)
    results = []
    for variant in ("plain", "prune", "cluster64"):
        run = subprocess.run([sys.executable, __file__, "--child", variant, str(steps),
                              str(size), str(batch)], capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-3000:])
            raise SystemExit(1)
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(results[-1])
    save_json("scale", results)
    plain = results[0]
    rows = [[r["variant"], f"{r['weights']:,}", f"{r['peak_mb']:.0f}",
             f"{r['peak_mb'] / plain['peak_mb']:.2f}x", f"{r['peak_mb'] - plain['peak_mb']:+.0f}",
             f"{r['ms_per_step']:.0f}", f"{r['ms_per_step'] / plain['ms_per_step']:.2f}x",
             f"{r['wrap_seconds']:.1f}"] for r in results]
    write_section("scale", "Scale: ResNet-50 (25.6 M weights), peak memory and step time",
                  md_table(["variant", "weights", "peak RSS (MB)", "/ plain", "Δ MB",
                            "ms/step", "/ plain", "wrap time (s)"], rows)
                  + f"\n\nInput {size}x{size}, batch {batch}, Adam, {steps} steps (median of "
                  "the steps after the first two); each variant in a fresh process, peak RSS "
                  "of that process. Target: clustering with 64 clusters <= 1.5x plain peak "
                  "memory.")


if __name__ == "__main__":
    main()
