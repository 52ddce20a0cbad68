"""TFLite Micro: leaves run on its interpreter, arenas are measured, C source compiles."""

import shutil
import subprocess

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt import firmware, micro
from collabopt.cli import main

pytestmark = pytest.mark.skipif(not micro.available(), reason="tflite-micro not installed")

# Methods of tflite::MicroMutableOpResolver as TFLite Micro names them
# (tensorflow/lite/micro/micro_mutable_op_resolver.h): the stub below declares these only, so
# a method name the generator invents does not compile.
TFLM_METHODS = ["AddAdd", "AddAveragePool2D", "AddBatchMatMul", "AddConcatenation",
                "AddConv2D", "AddDepthwiseConv2D", "AddDequantize", "AddEthosU",
                "AddFullyConnected", "AddHardSwish", "AddLogistic", "AddMaxPool2D", "AddMean",
                "AddMul", "AddPad", "AddPadV2", "AddQuantize", "AddRelu", "AddRelu6",
                "AddReshape", "AddSoftmax", "AddTanh", "AddUnidirectionalSequenceLSTM"]
STUB = """#pragma once
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
template <unsigned int tOpCount>
class MicroMutableOpResolver {
 public:
  unsigned int count = 0;
METHODS
 private:
  TfLiteStatus Add() { return ++count <= tOpCount ? kTfLiteOk : kTfLiteError; }
};
}  // namespace tflite
""".replace("METHODS", "\n".join(f"  TfLiteStatus {m}() {{ return Add(); }}"
                                 for m in TFLM_METHODS))


@pytest.fixture(scope="module")
def pcqat_leaf(tmp_path_factory, trained, digits):
    (x, y), (xt, yt) = digits
    tree = co.DeploymentTree(
        trained, (x[:600], y[:600]), (xt, yt),
        compile={"optimizer": keras.optimizers.Adam(3e-4),
                 "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        fit={"epochs": 1, "batch_size": 64, "verbose": 0}, clusters=8, latency_runs=1,
        targets=co.Targets(max_arena_bytes=10**6, max_flash_bytes=10**6))
    return tree.explore(tmp_path_factory.mktemp("tflm") / "run", paths=["PTQ", "PCQAT"],
                        log=lambda m: None)


def _atan2_file(path):
    inp = keras.Input((8,))
    h = keras.layers.Dense(8, name="proj")(inp)
    out = keras.layers.Lambda(lambda t: keras.ops.arctan2(t, t + 1.0), name="angle")(h)
    co.export_tflite(keras.Model(inp, out), path, quantization="float")
    return path


def test_a_tree_leaf_runs_on_tflm_as_on_litert(pcqat_leaf, digits):
    _, (xt, yt) = digits
    row = next(r for r in pcqat_leaf.rows if r["path"] == "PCQAT")
    assert row["tflm"] == "yes" and row["meets_targets"]
    report = co.tflm_report(row["file"])
    assert report.runs and report.arena_bytes == row["arena_bytes"] > 0
    assert report.flash_bytes == row["flash_bytes"] == row["size_bytes"]
    assert "FULLY_CONNECTED" in report.ops and report.tflm_version
    tflm, litert = co.predict_tflm(row["file"], xt), co.predict_tflite(row["file"], xt)
    agreement = np.mean(tflm.argmax(1) == litert.argmax(1))
    assert agreement >= 0.99, agreement  # reference kernels vs LiteRT's optimised ones
    step = float(np.min(np.diff(np.unique(litert))))  # one int8 step of the output
    assert np.max(np.abs(tflm - litert)) <= step + 1e-6
    assert co.evaluate_tflm(row["file"], xt, yt) == pytest.approx(
        row["int8_accuracy"], abs=1 - agreement + 1e-9)
    md = (pcqat_leaf.out_dir / "report.md").read_text()
    assert "PCQAT: runs on TFLM: yes (arena" in md and "| Arena (B) |" in md


def test_budgets_are_targets(pcqat_leaf):
    row = next(r for r in pcqat_leaf.rows if r["path"] == "PCQAT")
    tight = co.Targets(max_arena_bytes=row["arena_bytes"] - 1,
                       max_flash_bytes=row["flash_bytes"] - 1, max_sram_bytes=10**9)
    assert tight.failures(row, 1.0) == ["arena", "flash"] + (
        [] if row["vela_sram_bytes"] is not None else ["sram"])
    assert co.Targets(max_sram_bytes=10**9).failures({**row, "vela_sram_bytes": None}, 1) == [
        "sram"]  # unmeasured cannot meet a budget


def test_an_op_tflm_lacks_is_named_with_its_layer(tmp_path, capsys):
    path = _atan2_file(tmp_path / "atan2.tflite")
    report = co.tflm_report(path)
    assert not report.runs and report.arena_bytes is None
    assert report.unsupported == [{"op": "ATAN2", "layer": "angle"}]
    assert "no kernel for ATAN2 (from layer angle)" in report.summary
    with pytest.raises(RuntimeError, match="could not run"):
        co.predict_tflm(path, np.zeros((2, 8), np.float32))
    assert main(["export-c", str(path), "--out", str(tmp_path / "c")]) == 2
    assert "ATAN2 (from layer angle)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing half-written


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_generated_c_compiles_links_and_holds_the_file(tmp_path, pcqat_leaf, capsys):
    leaf = next(r for r in pcqat_leaf.rows if r["path"] == "PCQAT")["file"]
    out = tmp_path / "fw"
    assert main(["export-c", leaf, "--out", str(out), "--name", "digits_net", "--vela"]) == 0
    assert "digits_net_ops.h" in capsys.readouterr().out
    stub = tmp_path / "stub" / "tensorflow" / "lite" / "micro"
    stub.mkdir(parents=True)
    (stub / "micro_mutable_op_resolver.h").write_text(STUB)
    n_ops = len(set(co.inspect(leaf).operators))
    for name, data in (("digits_net", leaf), ("digits_net_vela", out / "digits_net_vela.tflite")):
        camel = "".join(p.capitalize() for p in name.split("_"))
        (tmp_path / f"{name}_main.cc").write_text(f"""
#include <cstdio>
#include "{name}_data.h"
#include "{name}_ops.h"
int main() {{
  {camel}OpResolver resolver;
  if (Register{camel}Ops(resolver) != kTfLiteOk) return 1;
  std::printf("%u %c%c%c%c %u %u\\n", g_{name}_data_len, g_{name}_data[4], g_{name}_data[5],
              g_{name}_data[6], g_{name}_data[7], resolver.count, k{camel}ArenaBytes);
  return reinterpret_cast<unsigned long>(g_{name}_data) % 16;
}}""")
        exe = tmp_path / name
        build = subprocess.run(
            ["c++", "-std=c++17", "-Wall", "-Werror", f"-I{out}", f"-I{tmp_path / 'stub'}",
             str(out / f"{name}_data.cc"), str(tmp_path / f"{name}_main.cc"), "-o", str(exe)],
            capture_output=True, text=True)
        assert build.returncode == 0, build.stderr
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        assert run.returncode == 0, run
        size, magic, count, arena = run.stdout.split()
        assert int(size) == len(open(data, "rb").read()) and magic == "TFL3"
        if name == "digits_net":
            assert int(count) == n_ops  # every op the file uses, each once
            assert int(arena) == co.tflm_report(leaf).arena_bytes
        else:
            assert int(count) == 1  # Vela: the whole graph is one ethos-u op here


def test_resolver_method_names_follow_tflm():
    assert [firmware.resolver_method(op) for op in (
        "CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "FULLY_CONNECTED", "RELU6",
        "HARD_SWISH", "L2_NORMALIZATION", "SPACE_TO_BATCH_ND", "SPLIT_V", "BATCH_MATMUL",
        "PADV2", "RESIZE_NEAREST_NEIGHBOR", "SELECT_V2", "CUSTOM:ethos-u")] == [
        "AddConv2D", "AddDepthwiseConv2D", "AddAveragePool2D", "AddFullyConnected",
        "AddRelu6", "AddHardSwish", "AddL2Normalization", "AddSpaceToBatchNd", "AddSplitV",
        "AddBatchMatMul", "AddPadV2", "AddResizeNearestNeighbor", "AddSelectV2", "AddEthosU"]
    with pytest.raises(ValueError, match="AddCustom"):
        firmware.resolver_method("CUSTOM:MyOp")
    with pytest.raises(ValueError, match="C identifier"):
        firmware.export_c("x.tflite", "out", name="my-model")


def test_inspect_tflm_and_a_missing_package(pcqat_leaf, capsys, monkeypatch):
    leaf = next(r for r in pcqat_leaf.rows if r["path"] == "PTQ")["file"]
    assert main(["inspect", "--tflm", leaf]) == 0
    assert "runs on TFLM: yes (arena" in capsys.readouterr().out
    monkeypatch.setitem(__import__("sys").modules, "tflite_micro", None)
    assert main(["inspect", "--tflm", leaf]) == 2
    assert "pip install 'collabopt[micro]'" in capsys.readouterr().err
