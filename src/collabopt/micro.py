"""The microcontroller end: a leaf on TFLite Micro (ops, measured arena, predictions).

TFLite Micro's op set is smaller than LiteRT's, and its tensor arena (the RAM a model needs)
is only known once its interpreter has planned the model. Both are read here from the TFLM
interpreter itself (PyPI ``tflite-micro``, reference kernels: extra ``[micro]``), never
guessed. The interpreter runs in a child process: it is native code that aborts on files it
does not accept, and must not take the caller's process (a tree run) with it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_MISSING_OP = re.compile(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'")
_CUSTOM_OP = re.compile(r"Didn't find op for custom opcode '([^']+)'")
_ARENA = re.compile(r"Arena allocation total (\d+) bytes")


class TFLMNotInstalled(ImportError):
    """The tflite-micro package is missing; the message says how to install it."""


@dataclass
class TFLMReport:
    """What TFLite Micro makes of a ``.tflite`` file."""

    path: str
    runs: bool  # the interpreter allocated the model and ran one inference
    arena_bytes: int | None  # tensor arena, as TFLM's recording allocator measured it
    flash_bytes: int  # the model data the firmware holds in flash (the file)
    ops: list[str]  # distinct operators of the file, in graph order
    unsupported: list[dict] = field(default_factory=list)  # {"op", "layer"}
    error: str | None = None
    tflm_version: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def summary(self) -> str:
        """One line: "runs on TFLM: yes (...)" or "no (OP in layer ...)"."""
        if self.runs:
            return (f"runs on TFLM: yes (arena {self.arena_bytes:,} B, flash "
                    f"{self.flash_bytes:,} B)")
        if self.unsupported:
            what = ", ".join(f"{u['op']} (from layer {u['layer']})" for u in self.unsupported)
            return f"runs on TFLM: no (TFLite Micro has no kernel for {what})"
        return f"runs on TFLM: no ({self.error})"

    def __str__(self) -> str:
        return self.summary


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tflite-micro")
    except PackageNotFoundError:
        return None


def available() -> bool:
    try:
        _require()
        return True
    except TFLMNotInstalled:
        return False


def _require() -> None:
    try:
        import tflite_micro  # noqa: F401
    except ImportError as err:
        raise TFLMNotInstalled("TFLite Micro is not installed: pip install "
                               "'collabopt[micro]' (the tflite-micro package)") from err


def _child(command: str, *args: str, timeout: float = 600) -> tuple[dict, str]:
    """Run ``python -m collabopt.micro COMMAND ARGS`` and return its JSON answer and stderr."""
    _require()
    run = subprocess.run([sys.executable, "-m", "collabopt.micro", command, *args],
                         capture_output=True, text=True, timeout=timeout)
    lines = run.stdout.strip().splitlines()
    if run.returncode == 0 and lines:
        return json.loads(lines[-1]), run.stderr
    if run.returncode < 0:
        import signal

        try:
            sig = signal.Signals(-run.returncode).name
        except ValueError:
            sig = f"signal {-run.returncode}"
        reason = (f"the TFLM interpreter aborted ({sig}) loading or running the file: a "
                  "kernel's internal check failed (e.g. a quantization scale outside what "
                  "it supports); this process is unaffected")
    else:
        tail = [line for line in run.stderr.splitlines() if line.strip()]
        reason = tail[-1] if tail else f"exit status {run.returncode}"
    return {"error": reason}, run.stderr


def tflm_report(path: str | os.PathLike) -> TFLMReport:
    """Load ``path`` on TFLite Micro, run one inference, and measure its tensor arena.

    An op TFLM has no kernel for is named with the layer it comes from; flash is the model
    data itself (the interpreter's code and kernels come on top, per firmware).
    """
    from collabopt.inspection import _load, operator_outputs

    data, _ = _load(path)
    ops = operator_outputs(path)
    answer, stderr = _child("report", str(path))
    missing = _MISSING_OP.findall(stderr) + _CUSTOM_OP.findall(stderr)
    unsupported = []
    for op in dict.fromkeys(missing):
        layer = next((layer for name, layer in ops if name in (op, "CUSTOM:" + op)), "?")
        unsupported.append({"op": op, "layer": layer})
    arena = _ARENA.search(stderr)
    return TFLMReport(
        path=str(path), runs=bool(answer.get("ok")),
        arena_bytes=int(arena.group(1)) if arena and answer.get("ok") else None,
        flash_bytes=len(data), ops=list(dict.fromkeys(name for name, _ in ops)),
        unsupported=unsupported,
        error=None if answer.get("ok") else (answer.get("error") or "failed"),
        tflm_version=_version())


def predict_tflm(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """The file's outputs on ``x`` computed by TFLite Micro, dequantized to float.

    Inputs are quantized with the file's own scale, as ``co.predict_tflite`` does, so the two
    interpreters can be compared sample by sample.
    """
    from collabopt.inspection import _load

    _load(path)
    with tempfile.TemporaryDirectory(prefix="collabopt-tflm-") as tmp:
        inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "y.npy"
        np.save(inputs, np.asarray(x))
        answer, _ = _child("predict", str(path), str(inputs), str(outputs))
        if not answer.get("ok"):
            raise RuntimeError(f"TFLite Micro could not run {path}: {answer.get('error')}. "
                               "co.tflm_report(path) says which op or allocation failed.")
        return np.load(outputs)


def evaluate_tflm(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of the file on TFLite Micro (see :func:`predict_tflm`)."""
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    out = predict_tflm(path, x)
    return float(np.mean(np.argmax(out.reshape(len(out), -1), axis=1) == y))


# --- the child process (imports only numpy and tflite_micro) -----------------------------
def _interpreter(path: str):
    from tflite_micro.python.tflite_micro import runtime

    arena = max(10 * os.path.getsize(path), 1 << 20)
    while True:  # a missing op fails at every size; a small arena only below its need
        try:
            return runtime.Interpreter.from_file(path, arena_size=arena)
        except RuntimeError:
            if arena >= 1 << 28:
                raise
            arena *= 4


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    q = detail["quantization_parameters"]
    if dtype.kind == "i" and len(q["scales"]) and dtype != np.int32:
        info = np.iinfo(dtype)
        v = np.round(x.astype(np.float32) / q["scales"][0] + q["zero_points"][0])
        return np.clip(v, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _dequantize(v: np.ndarray, detail: dict) -> np.ndarray:
    q = detail["quantization_parameters"]
    if np.dtype(detail["dtype"]).kind == "i" and len(q["scales"]):
        return (v.astype(np.float32) - q["zero_points"][0]) * np.float32(q["scales"][0])
    return v


def _child_main(command: str, path: str, *args: str) -> None:
    it = _interpreter(path)
    detail, out_detail = it.get_input_details(0), it.get_output_details(0)
    shape = tuple(int(s) for s in detail["shape"])
    if command == "report":
        it.set_input(np.zeros(shape, dtype=detail["dtype"]), 0)
        it.invoke()
        sys.stderr.flush()
        it.print_allocations()  # to stderr, read by the parent
    else:
        x = np.load(args[0])
        if tuple(x.shape[1:]) != shape[1:]:
            raise ValueError(f"{path} expects inputs of shape {shape[1:]}, got samples of "
                             f"shape {x.shape[1:]}")
        outputs = []
        for sample in x:
            it.set_input(_quantize(sample[None], detail), 0)
            it.invoke()
            outputs.append(_dequantize(np.array(it.get_output(0)), out_detail))
        np.save(args[1], np.concatenate(outputs))
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
