"""Which zoo models run on TFLite Micro after int8 PTQ, and the arena each needs.

    python benchmarks/bench_micro.py [MODEL ...]

Every model of `collabopt.zoo` (untrained, small inputs: the zoo's shapes; batch-norm
statistics taken from its data, as training would leave them: with the initial statistics
the activation ranges of the deep nets collapse to ~1e-8 and TFLM's softmax kernel aborts,
measured on all five MobileNet / EfficientNetB0 rows) is exported with
post-training int8 quantization in a child process of its own (the converter's calibrator
kills the process on some models: that row then says so), then loaded on TFLite Micro by
`co.tflm_report`: does it run, the tensor arena its interpreter measured, the flash (model
bytes), and any op TFLM has no kernel for, with its layer. The trained ResNet-8 base of
benchmarks/bases/ (where it and CIFAR-10 are present) adds a row with the class agreement of
TFLM and LiteRT on 500 test images. Writes the table into docs/microcontrollers.md between
its BENCH markers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "microcontrollers.md"


RESNET8 = "ResNet-8 (trained base, CIFAR-10)"


def _export(name: str, path: str) -> None:
    """Child: build model ``name`` and write its PTQ int8 file to ``path``."""
    import collabopt as co
    from collabopt.zoo import ZOO

    if name == RESNET8:
        from collabopt import datasets, models

        model = models.resnet8()
        model.load_weights(ROOT / "benchmarks" / "bases" / "resnet8_cifar10.keras")
        (x, _), _ = datasets.cifar10()
        x = x[:300]
    else:
        import keras

        from collabopt.core.rewrite import iter_layers

        model, x, y = ZOO[name]()
        norms = [layer for layer in iter_layers(model)
                 if isinstance(layer, keras.layers.BatchNormalization)]
        if norms:  # one step that learns nothing but the batch statistics
            for layer in norms:
                layer.momentum = 0.0
            model.compile(keras.optimizers.SGD(0.0), keras.losses.
                          SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    co.export_tflite(model, path, representative_data=x)


def _agreement(path) -> str:
    import numpy as np

    import collabopt as co
    from collabopt import datasets

    _, (xt, _) = datasets.cifar10()
    xt = xt[::len(xt) // 500]  # spread: the test set is sorted by class
    tflm, litert = co.predict_tflm(path, xt), co.predict_tflite(path, xt)
    return f"same class as LiteRT on {np.mean(tflm.argmax(1) == litert.argmax(1)):.1%} of {len(xt)}"


def main(argv=None) -> int:
    import collabopt as co
    from collabopt.zoo import ZOO

    names = (argv if argv is not None else sys.argv[1:]) or list(ZOO)
    everything = argv is None and len(names) == len(ZOO)
    if everything and (ROOT / "benchmarks" / "bases" / "resnet8_cifar10.keras").exists():
        names.append(RESNET8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = Path(tmp) / f"{name}.tflite"
            start = time.perf_counter()
            run = subprocess.run([sys.executable, __file__, "--export", name, str(path)],
                                 capture_output=True, text=True, timeout=1800)
            if run.returncode != 0:
                lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
                why = (f"killed by signal {-run.returncode}" if run.returncode < 0
                       else lines[-1].split(": ", 1)[-1].split(";")[0] if lines
                       else f"exit {run.returncode}")
                rows.append((name, f"PTQ export failed: {why}", "–", "–", "–"))
                print(name, rows[-1][1], flush=True)
                continue
            report = co.tflm_report(path)
            fully = co.inspect(path).fully_integer
            rows.append((name, "yes" if report.runs else "no",
                         f"{report.arena_bytes:,}" if report.arena_bytes else "–",
                         f"{report.flash_bytes:,}",
                         ", ".join(f"no kernel for {u['op']} (layer {u['layer']})"
                                   for u in report.unsupported)
                         or (_agreement(path) if name == RESNET8 and report.runs
                             else "" if report.runs else str(report.error).split(":")[0])
                         + ("" if fully else " (file not fully int8)")))
            print(name, rows[-1], f"{time.perf_counter() - start:.0f}s", flush=True)
    from collabopt.micro import _version

    table = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')}, tflite-micro {_version()}, "
        f"`python benchmarks/bench_micro.py`.", "",
        "| model (collabopt.zoo) | runs on TFLM | arena (B) | flash (B) | notes |",
        "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in rows]])
    print(table)
    if everything:
        from _common import replace_marked

        replace_marked(DOC, table)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--export"]:
        _export(*sys.argv[2:4])
        sys.exit(0)
    sys.exit(main())
