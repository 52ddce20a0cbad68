"""Files ready for firmware: a leaf as C++ source for TFLite Micro, and as Vela's Ethos-U file.

``export_c`` writes ``<name>_data.cc`` / ``.h`` (the model as an aligned ``const unsigned
char`` array and its length, which the linker places in flash) and ``<name>_ops.h``, an op
resolver that registers exactly the operators the file uses (every kernel linked costs
flash; ``AllOpsResolver`` links them all). Where TFLite Micro is installed the header also
carries the tensor arena size its interpreter measured.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# builtin operators whose MicroMutableOpResolver method is not the CamelCase of the name
_METHOD = {"BATCH_MATMUL": "BatchMatMul", "PADV2": "PadV2",
           "UNIDIRECTIONAL_SEQUENCE_LSTM": "UnidirectionalSequenceLSTM",
           "CUSTOM:ethos-u": "EthosU"}


def resolver_method(op: str) -> str:
    """``CONV_2D`` -> ``AddConv2D``: the ``tflite::MicroMutableOpResolver`` method for an op."""
    if op in _METHOD:
        return "Add" + _METHOD[op]
    if op.startswith("CUSTOM:"):
        raise ValueError(f"custom operator {op[7:]!r} has no built-in TFLite Micro kernel: "
                         "register your own with resolver.AddCustom()")
    words = [w if re.fullmatch(r"\d+D|[LV]\d+", w) else w.capitalize() for w in op.split("_")]
    return "Add" + "".join(words)


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name must be a C identifier (letters, digits, _), got {name!r}")
    return name


def export_c(path: str | os.PathLike, out_dir: str | os.PathLike, name: str = "model",
             vela_accelerator: str | None = None) -> dict[str, Path]:
    """Write ``path`` as C++ source for TFLite Micro into ``out_dir``; returns the files.

    With ``vela_accelerator`` (e.g. "ethos-u55-128", needs ethos-u-vela), the Vela-compiled
    file for that Ethos-U is written too, as ``<name>_vela.tflite`` and as its own C source.
    """
    from collabopt import micro

    name = _identifier(name)
    out = Path(out_dir)
    arena = None
    if micro.available():
        report = micro.tflm_report(path)
        if not report.runs:
            raise ValueError(f"{path} is not exported for TFLite Micro; {report.summary}")
        arena = report.arena_bytes
        note = (f"Tensor arena measured by TFLite Micro's interpreter "
                f"(tflite-micro {report.tflm_version})")
    else:
        note = "install tflite-micro to have the tensor arena measured here"
    files = _write_c(path, out, name, arena, note)
    if vela_accelerator:
        from collabopt import vela

        compiled = vela.compile_for_ethos_u(path, out / f"{name}_vela.tflite",
                                            vela_accelerator)
        sram = vela.vela_report(path, vela_accelerator).sram_bytes
        files["vela"] = compiled
        # its NPU part is one ethos-u op that only the NPU driver runs: Vela sizes the arena
        vela_files = _write_c(compiled, out, f"{name}_vela", sram, f"SRAM Vela plans for "
                              f"{vela_accelerator} (the NPU part's tensor arena)")
        files.update({f"vela_{k}": v for k, v in vela_files.items()})
    return files


def _write_c(path, out: Path, name: str, arena: int | None, note: str) -> dict[str, Path]:
    from collabopt.inspection import _load, operator_outputs

    data, _ = _load(path)
    ops = list(dict.fromkeys(op for op, _ in operator_outputs(path)))
    methods = [resolver_method(op) for op in ops]  # fails before any file is written
    out.mkdir(parents=True, exist_ok=True)
    guard, camel, source = f"COLLABOPT_{name.upper()}", _camel(name), Path(path).name
    files = {"header": out / f"{name}_data.h", "source": out / f"{name}_data.cc",
             "ops": out / f"{name}_ops.h"}
    arena_line = (f"// {note}.\nconstexpr unsigned int k{camel}ArenaBytes = {arena};\n"
                  if arena is not None else f"// ({note})\n")
    head = f"// {source} for TFLite Micro, written by collabopt"
    _write(files["header"], f"""{head}: {len(data)} bytes.
#ifndef {guard}_DATA_H_
#define {guard}_DATA_H_

extern const unsigned char g_{name}_data[];
extern const unsigned int g_{name}_data_len;
{arena_line}
#endif  // {guard}_DATA_H_
""")
    _write(files["source"], f"""{head}.
#include "{name}_data.h"

// 16-byte aligned: TFLite Micro reads the flatbuffer in place.
alignas(16) const unsigned char g_{name}_data[] = {{
{_hex(data)}
}};
const unsigned int g_{name}_data_len = {len(data)};
""")
    adds = "\n".join(f"  if (resolver.{m}() != kTfLiteOk) return kTfLiteError;  // {op}"
                     for m, op in zip(methods, ops, strict=True))
    _write(files["ops"], f"""{head}: the operators it uses ({len(ops)}), and only those.
#ifndef {guard}_OPS_H_
#define {guard}_OPS_H_

#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"

using {camel}OpResolver = tflite::MicroMutableOpResolver<{len(ops)}>;

inline TfLiteStatus Register{camel}Ops({camel}OpResolver& resolver) {{
{adds}
  return kTfLiteOk;
}}

#endif  // {guard}_OPS_H_
""")
    return files


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _hex(data: bytes, per_line: int = 12) -> str:
    return "\n".join("  " + " ".join(f"0x{b:02x}," for b in data[i:i + per_line])
                     for i in range(0, len(data), per_line))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)
