import json

import numpy as np
import pytest

import collabopt as co
from collabopt.inspection import InvalidModelError

from .conftest import compile_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained, digits):
    (x, y), _ = digits
    out = tmp_path_factory.mktemp("inspect")
    clustered = compile_model(co.cluster(co.fold_batchnorm(trained), 8, verbose=False))
    clustered.fit(x[:256], y[:256], epochs=1, verbose=0)
    files = {
        "dense": co.export_tflite(trained, out / "dense.tflite", representative_data=x[:100]),
        "float": co.export_tflite(trained, out / "float.tflite", quantization="float"),
        "clustered": co.export_tflite(clustered, out / "clustered.tflite",
                                      representative_data=x[:100], per_channel_weights=False),
    }
    return files, clustered


def test_report_fields(exported):
    files, _ = exported
    report = co.inspect(files["dense"])
    assert report.size_bytes == files["dense"].stat().st_size
    assert 0 < report.zip_bytes < report.size_bytes
    assert report.fully_integer and report.non_integer_ops == []
    assert {t.layer for t in report.tensors} == {"conv1", "conv2", "logits"}
    conv2 = next(t for t in report.tensors if t.layer == "conv2")
    assert conv2.shape == (32, 3, 3, 16) and conv2.dtype == "int8"
    assert conv2.quantization == "per-channel" and conv2.n_scales == 32
    assert 0 < conv2.entropy_bits <= 8
    d = json.loads(report.to_json())
    assert d["tensors"][0]["name"] and "unique_per_channel_max" in d["tensors"][0]
    assert "conv2" in report.table()


def test_float_model_flagged(exported):
    files, _ = exported
    report = co.inspect(files["float"])
    assert not report.fully_integer
    assert any("(float)" in op for op in report.non_integer_ops)


def test_verify_catches_destroyed_codebook(tmp_path, exported, digits):
    (x, _), _ = digits
    files, clustered = exported
    co.verify(files["clustered"], clustered)
    default = co.export_tflite(clustered, tmp_path / "default.tflite",
                               representative_data=x[:100])
    co.verify(default, clustered)  # the default finds the per-tensor codebooks and keeps them
    broken = co.export_tflite(clustered, tmp_path / "broken.tflite",
                              representative_data=x[:100], per_channel_weights=True)
    with pytest.raises(co.VerificationError, match="unique per tensor grew") as err:
        co.verify(broken, clustered)
    assert "conv2.kernel" in str(err.value)


def test_verify_catches_lost_zeros(tmp_path, trained, digits):
    """A file exported from the unpruned model does not hold the pruned model's zeros."""
    (x, _), _ = digits
    pruned = co.strip(co.prune(trained, 0.5, verbose=False))
    path = co.export_tflite(trained, tmp_path / "dense.tflite", representative_data=x[:50])
    with pytest.raises(co.VerificationError, match="zero"):
        co.verify(path, pruned)


def test_evaluate_tflite(exported, trained, digits):
    files, _ = exported
    _, (xt, yt) = digits
    acc = co.evaluate_tflite(files["dense"], xt, yt, batch_size=32)
    keras_acc = float(np.mean(np.argmax(trained.predict(xt, verbose=0), 1) == yt))
    assert abs(acc - keras_acc) < 0.02
    with pytest.raises(ValueError, match="samples"):
        co.evaluate_tflite(files["dense"], xt, yt[:-1])
    with pytest.raises(ValueError, match="shape"):
        co.evaluate_tflite(files["dense"], xt[:, :4], yt)


def test_predict_tflite_dequantizes_outputs(exported, trained, digits):
    """The file's outputs come back in the Keras model's units, batch by batch or not."""
    files, _ = exported
    _, (xt, _) = digits
    keras_out = trained.predict(xt, verbose=0)
    file_out = co.predict_tflite(files["dense"], xt, batch_size=7)
    assert file_out.shape == keras_out.shape and file_out.dtype == np.float32
    spread = keras_out.max() - keras_out.min()
    assert np.median(np.abs(file_out - keras_out)) < 0.05 * spread
    assert np.mean(file_out.argmax(1) == keras_out.argmax(1)) > 0.95
    np.testing.assert_array_equal(co.predict_tflite(files["dense"], xt[:5], batch_size=1),
                                  file_out[:5])


def test_malformed_files(tmp_path, exported):
    files, _ = exported
    data = files["dense"].read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(InvalidModelError, match="damaged or truncated"):
        co.inspect(truncated)
    text = tmp_path / "notes.tflite"
    text.write_text("hello, not a model")
    with pytest.raises(InvalidModelError, match="not a TFLite model"):
        co.inspect(text)
    with pytest.raises(FileNotFoundError):
        co.inspect(tmp_path / "missing.tflite")
    with pytest.raises(InvalidModelError):
        co.evaluate_tflite(text, np.zeros((1, 8, 8, 1)), np.zeros(1))


def test_vela_report(exported):
    from collabopt import vela

    if not vela.available():
        pytest.skip("ethos-u-vela not installed")
    files, _ = exported
    dense = co.vela_report(files["dense"])
    clustered = co.vela_report(files["clustered"])
    assert dense.cycles > 0 and dense.encoded_weight_bytes > 0 and dense.npu_ops >= 3
    assert clustered.encoded_weight_bytes < dense.encoded_weight_bytes  # codebook compresses


def test_plots(tmp_path, exported, trained):
    files, clustered = exported
    png = co.plot_weight_density({"baseline": trained, "clustered": clustered,
                                  "file": str(files["clustered"])}, "conv2",
                                 tmp_path / "d.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = [{"path": "a", "zip_bytes": 10, "int8_accuracy": 0.9},
            {"path": "b", "zip_bytes": 5, "int8_accuracy": 0.95},
            {"path": "c", "zip_bytes": 20, "int8_accuracy": 0.8}]
    from collabopt.plots import pareto_front

    assert pareto_front([(r["zip_bytes"], r["int8_accuracy"]) for r in rows]) == [1]
    assert co.plot_tradeoff(rows, tmp_path / "p.png").stat().st_size > 1000
    with pytest.raises(KeyError, match="no_layer"):
        co.plot_weight_density([trained], "no_layer", tmp_path / "x.png")


def test_verify_float_where_int8_expected(exported, trained):
    files, _ = exported
    with pytest.raises(co.VerificationError, match="not a fully-int8 model"):
        co.verify(files["float"], trained)
    checks = co.verify(files["float"], trained, expect_int8=False)
    assert all(c.found for c in checks)


def test_verify_pairs_kernels_through_batchnorm_folding(tmp_path):
    """Same-size depthwise kernels, each followed by a batch norm the converter folds in: the
    file's kernels are scaled per channel, yet each must be checked against its own layer."""
    import keras

    rng = np.random.default_rng(0)
    inp = keras.Input((8, 8, 16))
    x = inp
    for i in range(3):
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    for layer in model.layers:  # bn0 scales by ~100: a plain distance pairs dw0 wrongly
        if isinstance(layer, keras.layers.BatchNormalization):
            gain = 100.0 if layer.name == "bn0" else 1.0
            layer.set_weights([gain * rng.uniform(0.5, 2, 16), rng.normal(size=16),
                               rng.normal(size=16), rng.uniform(0.5, 2, 16)])
        if isinstance(layer, keras.layers.DepthwiseConv2D):  # 75 % zeros, distinct patterns
            w = rng.normal(size=layer.kernel.shape)
            layer.set_weights([w * (rng.random(w.shape) > 0.75)])
    data = rng.normal(size=(64, 8, 8, 16)).astype("float32")
    path = co.export_tflite(model, tmp_path / "bn.tflite", representative_data=data)
    checks = co.verify(path, model)
    assert [c.layer for c in checks if c.layer.startswith("dw")] == ["dw0", "dw1", "dw2"]
    assert all(c.found and c.zeros_lost == 0 for c in checks)


def test_short_tensor_names_shrink_the_file_and_change_nothing_else(tmp_path, exported, trained,
                                                                    digits):
    (x, _), (xt, _) = digits
    files, _ = exported
    full = co.export_tflite(trained, tmp_path / "full.tflite", representative_data=x[:100],
                            short_tensor_names=False)
    short, long = co.inspect(files["dense"]), co.inspect(full)
    assert short.size_bytes < long.size_bytes and short.zip_bytes < long.zip_bytes
    assert [(t.layer, t.op) for t in short.tensors] == [(t.layer, t.op) for t in long.tensors]
    for a, b in zip(short.tensors, long.tensors, strict=True):
        assert np.array_equal(a.values, b.values)
    from ai_edge_litert.interpreter import Interpreter
    short_i, long_i = (Interpreter(model_path=str(p)) for p in (files["dense"], full))
    assert any(";" in d["name"] for d in long_i.get_tensor_details())  # fused op lists
    assert not any(";" in d["name"] for d in short_i.get_tensor_details())
    for io in ("get_input_details", "get_output_details"):  # inputs and outputs keep theirs
        assert getattr(short_i, io)()[0]["name"] == getattr(long_i, io)()[0]["name"]
    np.testing.assert_array_equal(co.predict_tflite(files["dense"], xt[:50]),
                                  co.predict_tflite(full, xt[:50]))


def _buffer_starts(path) -> list[int]:
    """Where each non-empty weight buffer's bytes start in the file."""
    from ai_edge_litert import schema_py_generated as schema

    data = open(path, "rb").read()
    model = schema.Model.GetRootAs(data, 0)
    starts = []
    for i in range(model.BuffersLength()):
        b = model.Buffers(i)
        if b.DataLength():
            starts.append(b._tab.Vector(b._tab.Offset(4)))
    return starts


def test_short_names_keep_weight_buffers_16_byte_aligned(exported):
    files, _ = exported
    starts = _buffer_starts(files["dense"])
    assert starts and all(s % 16 == 0 for s in starts)
