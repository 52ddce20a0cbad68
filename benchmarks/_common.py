"""Shared helpers of the benchmark scripts: versions, JSON results, and sections of
docs/BENCHMARKS.md replaced in place between markers (so scripts can run in any order)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"


def versions() -> str:
    import keras
    import numpy
    import tensorflow as tf

    return (f"Python {platform.python_version()}, Keras {keras.__version__} "
            f"({keras.backend.backend()}), TensorFlow {tf.__version__}, NumPy {numpy.__version__},"
            f" {os.cpu_count()} CPU cores")


def command() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def save_json(name: str, data) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = time.strftime("%Y-%m-%d")
    block = (f"{start}\n## {title}\n\nCommand: `{command()}` ({stamp})  \n"
             f"Versions: {versions()}\n\n{body.strip()}\n{end}")
    text = DOC.read_text() if DOC.exists() else (
        "# Benchmarks\n\nEvery table below is written by the script named in its command line; "
        "ratios are measured side by side in one run (these machines are noisy).\n")
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def replace_marked(doc: Path, text: str) -> None:
    """Put ``text`` between the page's ``<!-- BENCH:start -->`` / ``end`` markers."""
    start, end = "<!-- BENCH:start -->", "<!-- BENCH:end -->"
    head, rest = doc.read_text().split(start)
    doc.write_text(head + start + "\n" + text + "\n" + end + rest.split(end)[1])


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def timed_fit(keras, model, x, y, batch_size, callbacks=()) -> list[float]:
    """One epoch of ``model.fit``; seconds of each training step. ``keras`` is passed in so
    that the tf_keras scripts of benchmarks/tfmot_env share this helper."""
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0, shuffle=False,
              callbacks=[*callbacks, Timer()])
    return times
