"""The converter runs apart: its crash is an ExportError; integer inputs calibrate as such."""

import os
import signal
import threading

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.export import ExportError
from collabopt.zoo import ZOO


def test_a_converter_crash_is_an_export_error_and_the_next_export_works(tmp_path, trained,
                                                                       digits, monkeypatch):
    """A segfault of the converter process (as its calibrator did on Keras 3 LSTMs before
    they were unrolled) is simulated by sending it SIGSEGV in the middle of a conversion."""
    from collabopt import export

    model, x, _ = ZOO["MobileNetV2"]()
    sent = export._send

    def send_then_crash(stream, job):
        sent(stream, job)
        threading.Timer(0.5, os.kill, (export._converter._proc.pid, signal.SIGSEGV)).start()

    monkeypatch.setattr(export, "_send", send_then_crash)
    with pytest.raises(ExportError, match=r"crashed.*SIGSEGV.*Fatal Python error") as err:
        co.export_tflite(model, tmp_path / "mnv2.tflite", representative_data=x)
    assert "your process is fine" in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing half-written
    monkeypatch.setattr(export, "_send", sent)
    (xd, _), _ = digits
    path = co.export_tflite(trained, tmp_path / "cnn.tflite", representative_data=xd[:100])
    assert co.inspect(path).fully_integer  # same process, a fresh converter


@keras.saving.register_keras_serializable(package="test_converter")
class Angle(keras.layers.Layer):
    """An op without an int8 kernel (ATAN2): no fully-int8 file can hold it."""

    def call(self, t):
        return keras.ops.arctan2(t, t + 1.0)


def test_a_tree_records_a_failed_leaf_and_writes_its_report(tmp_path):
    inp = keras.Input((8,))
    h = Angle(name="angle")(keras.layers.Dense(8, name="proj")(inp))
    model = keras.Model(inp, keras.layers.Dense(4, name="head")(h))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype("float32"), rng.integers(0, 4, 32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    tree = co.DeploymentTree(model, (x, y), (x, y), fit={"epochs": 1, "verbose": 0},
                             latency_runs=1, vela_accelerator=None,
                             compile={"optimizer": "adam", "loss": loss})
    result = tree.explore(tmp_path / "run", paths=["PTQ"], log=lambda m: None)
    assert result.rows == [] and [f["path"] for f in result.failed] == ["PTQ"]
    assert "ATAN2(float) from layer 'angle'" in result.failed[0]["error"]
    assert "Failed leaves" in (tmp_path / "run" / "report.md").read_text()


def test_integer_token_inputs_calibrate_on_their_own_dtype(tmp_path):
    model, tokens, _ = ZOO["text_cnn"]()
    path = co.export_tflite(model, tmp_path / "text.tflite", representative_data=tokens)
    report = co.inspect(path)
    assert report.input_dtype == "int32" and not report.non_integer_ops
    keras_out = model.predict(tokens, verbose=0)
    file_out = co.predict_tflite(path, tokens)
    assert np.mean(keras_out.argmax(1) == file_out.argmax(1)) >= 0.75  # untrained, 8 samples
    with pytest.raises(ValueError, match="must hold integers for an int32 input"):
        co.export_tflite(model, tmp_path / "t2.tflite",
                         representative_data=tokens.astype(np.float32))


def test_a_file_xnnpack_rejects_warns_at_export_and_still_runs(tmp_path):
    """A conv whose output range is far narrower than its input's: LiteRT's default delegate
    fails on it (aborts the process, on EfficientNetV2B0's file), the builtin kernels do not."""
    import subprocess
    import sys

    from collabopt.inspection import xnnpack_rejected_ops

    keras.utils.set_random_seed(0)

    def qat_model():
        inp = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(4, 3, name="conv")(inp)
        return co.quantize(keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h))),
                           verbose=False)

    assert not xnnpack_rejected_ops(co.export_tflite(qat_model(), tmp_path / "fine.tflite"))
    qat = qat_model()
    for v in qat.weights:  # a collapsed output range behind a wide input range
        if v.path.startswith("conv/input_range"):
            v.assign(np.sign(v.numpy()) * 1000.0)
        if v.path.startswith("conv/output_range"):
            v.assign(np.sign(v.numpy()) * 0.001)
    with pytest.warns(RuntimeWarning, match="XNNPACK.*CONV_2D of layer 'conv'"):
        path = co.export_tflite(qat, tmp_path / "collapsed.tflite")
    (op, layer, ratio), = xnnpack_rejected_ops(path)
    assert (op, layer) == ("CONV_2D", "conv") and ratio >= 256
    default = subprocess.run(  # the interpreter as it comes: XNNPACK refuses the file
        [sys.executable, "-c", "from ai_edge_litert.interpreter import Interpreter; "
         f"Interpreter(model_path={str(path)!r}).allocate_tensors()"], capture_output=True)
    assert default.returncode != 0
    x = np.random.default_rng(0).uniform(-1, 1, (5, 8, 8, 1)).astype("float32")
    assert co.predict_tflite(path, x).shape == (5, 3)
