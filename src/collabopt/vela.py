"""Ethos-U figures from Arm's Vela compiler (optional extra: ``pip install collabopt[vela]``).

Vela compresses weights losslessly for the NPU, so sparsity and shared values show up here as
fewer encoded weight bytes and fewer cycles, the numbers an Ethos-U user ships on.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


class VelaNotInstalled(ImportError):
    pass


@dataclass
class VelaReport:
    accelerator: str
    original_weight_bytes: int
    encoded_weight_bytes: int
    sram_bytes: int
    flash_bytes: int
    cycles: int
    inference_ms: float
    clock_mhz: float
    npu_ops: int
    cpu_ops: int

    def to_dict(self) -> dict:
        return asdict(self)


def _vela_command() -> list[str]:
    exe = Path(sys.executable).with_name("vela")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("vela")
    if found:
        return [found]
    raise VelaNotInstalled("Arm Vela is not installed: pip install 'collabopt[vela]' "
                           "(the ethos-u-vela package)")


def _run_vela(path, accelerator: str, out: str, timeout: float):
    from collabopt.inspection import _load

    _load(path)  # clear errors for missing or damaged files
    run = subprocess.run([*_vela_command(), str(path), "--accelerator-config", accelerator,
                          "--output-dir", out], capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"vela failed on {path} for {accelerator}: {' | '.join(tail)}")
    return run


def compile_for_ethos_u(path: str | os.PathLike, out_path: str | os.PathLike,
                        accelerator: str = "ethos-u55-128", timeout: float = 300) -> Path:
    """The Vela-compiled ``.tflite`` of ``path`` for ``accelerator``, written to ``out_path``."""
    with tempfile.TemporaryDirectory(prefix="collabopt-vela-") as out:
        _run_vela(path, accelerator, out, timeout)
        compiled = next(Path(out).glob("*_vela.tflite"), None)
        if compiled is None:
            raise RuntimeError(f"vela wrote no optimised file for {path}")
        target = Path(out_path)
        tmp = target.with_name(target.name + ".partial")
        shutil.copyfile(compiled, tmp)
        os.replace(tmp, target)
    return target


def vela_report(path: str | os.PathLike, accelerator: str = "ethos-u55-128",
                timeout: float = 300) -> VelaReport:
    """Compile ``path`` with Vela for ``accelerator`` and read its summary."""
    with tempfile.TemporaryDirectory(prefix="collabopt-vela-") as out:
        run = _run_vela(path, accelerator, out, timeout)
        summaries = list(Path(out).glob("*_summary_*.csv"))
        if not summaries:
            raise RuntimeError(f"vela wrote no summary for {path}")
        with open(summaries[0]) as f:
            row = next(csv.DictReader(f))
    npu = cpu = 0
    for line in run.stdout.splitlines():
        if line.startswith("NPU operators"):
            npu = int(line.split("=")[1].split("(")[0])
        elif line.startswith("CPU operators"):
            cpu = int(line.split("=")[1].split("(")[0])
    clock = float(row["core_clock"])
    return VelaReport(
        accelerator=accelerator,
        original_weight_bytes=int(float(row["total_original_weights"])),
        encoded_weight_bytes=int(float(row["total_npu_encoded_weights"])),
        sram_bytes=int(float(row["sram_memory_used"]) * 1024),
        flash_bytes=int(float(row["off_chip_flash_memory_used"]) * 1024
                        + float(row["on_chip_flash_memory_used"]) * 1024),
        cycles=int(float(row["cycles_total"])),
        inference_ms=float(row["inference_time"]) * 1000,
        clock_mhz=clock / 1e6,
        npu_ops=npu,
        cpu_ops=cpu,
    )


def available() -> bool:
    try:
        _vela_command()
        return True
    except VelaNotInstalled:
        return False
