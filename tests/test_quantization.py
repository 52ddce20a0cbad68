import os

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.export import ExportError
from collabopt.quantization import scheme_of

from .conftest import compile_model


def _kernels(model):
    plain = co.strip(model)
    return {layer.name: layer.kernel.numpy() for layer in plain.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))}


def test_qat_exports_int8_without_calibration(tmp_path, trained, digits):
    (x, y), (xt, yt) = digits
    qat = compile_model(co.quantize(trained, verbose=False))
    assert scheme_of(qat) == "QAT"
    qat.fit(x, y, epochs=1, verbose=0)
    path = co.export_tflite(qat, tmp_path / "qat.tflite")
    report = co.inspect(path)
    assert report.fully_integer and report.input_dtype == "int8"
    assert not any(op.startswith(("CUSTOM", "Flex")) for op in report.operators)
    assert all(t.dtype == "int8" for t in report.tensors)
    keras_acc = qat.evaluate(xt, yt, verbose=0)[1]
    file_acc = co.evaluate_tflite(path, xt, yt)
    assert abs(file_acc - keras_acc) <= 0.01
    ptq = co.export_tflite(trained, tmp_path / "ptq.tflite", representative_data=x[:200])
    assert co.inspect(ptq).fully_integer


@pytest.mark.parametrize("scheme,per_channel", [("PQAT", False), ("CQAT", False),
                                                 ("PCQAT", False), ("CQAT", True),
                                                 ("PCQAT", True)])
def test_preserving_qat_in_file(tmp_path, trained, digits, scheme, per_channel):
    (x, y), (xt, yt) = digits
    model = co.fold_batchnorm(trained)
    if "P" in scheme[:2]:
        pruned = compile_model(co.prune(model, 0.5, verbose=False))
        pruned.fit(x, y, epochs=1, verbose=0)
        model = co.strip(pruned)
    if "C" in scheme:
        clustered = compile_model(co.cluster(model, 8, per_channel=per_channel, verbose=False))
        clustered.fit(x, y, epochs=1, verbose=0)
        model = co.strip(clustered)
    before = _kernels(model)
    qat = compile_model(co.quantize(model, verbose=False), lr=3e-4)
    assert scheme_of(qat) == scheme
    qat.fit(x, y, epochs=1, verbose=0)
    after = _kernels(qat)
    for name, k in before.items():
        if "P" in scheme[:2]:
            assert np.all(after[name][k == 0] == 0)  # zeros stay zeros
            if "C" not in scheme:  # only a cluster's 0 may take in survivors
                np.testing.assert_array_equal(after[name] == 0, k == 0)
        if "C" in scheme:
            axes = (-1,)
            from collabopt.core.structure import detect

            b, a = detect(k, axes), detect(after[name], axes)
            if per_channel:
                assert a.unique_per_channel_max <= b.unique_per_channel_max
            else:
                assert a.unique <= b.unique <= 8
    path = co.export_tflite(qat, tmp_path / f"{scheme}.tflite")
    report = co.inspect(path)
    assert report.fully_integer
    checks = co.verify(path, qat)  # zeros identical, unique counts within what Keras had
    assert len(checks) == 3 and all(c.found for c in checks)
    for t in report.tensors:
        if "C" in scheme:
            assert (t.unique_per_channel_max if per_channel else t.unique) <= 8
            if not per_channel:
                assert t.quantization == "per-tensor"
        if "P" in scheme[:2]:
            assert t.sparsity >= 0.49
    keras_acc = qat.evaluate(xt, yt, verbose=0)[1]
    assert abs(co.evaluate_tflite(path, xt, yt) - keras_acc) <= 0.01


def test_preserve_forcing(trained):
    with pytest.raises(ValueError, match="no selected weight has sparsity"):
        co.quantize(trained, preserve="sparsity", verbose=False)
    with pytest.raises(ValueError, match="no selected weight has clusters"):
        co.quantize(trained, preserve="clusters", verbose=False)
    with pytest.raises(ValueError, match="preserve must be"):
        co.quantize(trained, preserve="zeros")
    pruned = co.strip(co.prune(trained, 0.5, verbose=False))
    assert scheme_of(co.quantize(pruned, preserve="none", verbose=False)) == "QAT"
    assert scheme_of(co.quantize(pruned, verbose=False)) == "PQAT"


def test_qat_save_load_resume(tmp_path, trained, digits):
    (x, y), _ = digits
    qat = compile_model(co.quantize(trained, verbose=False))
    qat.fit(x[:64], y[:64], epochs=1, verbose=0)
    qat.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x[:16], verbose=0), qat.predict(x[:16], verbose=0),
                               atol=1e-6)
    loaded.fit(x[:64], y[:64], epochs=1, verbose=0)


def test_export_modes_and_errors(tmp_path, trained, digits):
    (x, _), _ = digits
    for mode in ("dynamic", "float"):
        path = co.export_tflite(trained, tmp_path / f"{mode}.tflite", quantization=mode)
        assert not co.inspect(path).fully_integer
    with pytest.raises(ValueError, match="representative_data"):
        co.export_tflite(trained, tmp_path / "a.tflite")
    with pytest.raises(ValueError, match="shape"):
        co.export_tflite(trained, tmp_path / "a.tflite", representative_data=x[:, :4])
    with pytest.raises(ValueError, match="float"):
        co.export_tflite(trained, tmp_path / "a.tflite",
                         representative_data=(x * 16).astype("int32"))
    with pytest.raises(ValueError, match="quantization"):
        co.export_tflite(trained, tmp_path / "a.tflite", quantization="int4")
    with pytest.raises(ExportError, match="does not exist"):
        co.export_tflite(trained, tmp_path / "no" / "a.tflite", representative_data=x[:10])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway
            with pytest.raises(ExportError, match="not writable"):
                co.export_tflite(trained, locked / "a.tflite", representative_data=x[:10])
    finally:
        locked.chmod(0o700)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic.tflite", "float.tflite",
                                                         "locked"]


def test_unsupported_op_for_int8(tmp_path):
    inp = keras.Input((8,))
    out = keras.layers.Dense(4)(keras.layers.Lambda(lambda t: keras.ops.erf(t))(inp))
    model = keras.Model(inp, out)
    with pytest.raises(ExportError, match="int8"):
        co.export_tflite(model, tmp_path / "e.tflite",
                         representative_data=np.random.rand(20, 8).astype("float32"))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_no_range_between_a_layer_and_its_relu(trained):
    """conv -> BN (kept or folded) -> ReLU: only the ReLU output is fake-quantized, as the
    converter fuses them and quantizes once."""
    for batchnorm, kind in (("keep", keras.layers.BatchNormalization),
                            ("fold", co.quantization.FoldedBatchNorm)):
        qat = co.quantize(trained, batchnorm=batchnorm, verbose=False)
        assert type(qat.get_layer("conv1_bn")) is kind
        assert qat.get_layer("conv1").output_range is None
        assert qat.get_layer("conv1_relu").output_range is not None
        assert qat.get_layer("logits").output_range is not None


def _moving_means(model):
    return {w.path: w.numpy().copy() for w in model.weights if "moving_mean" in w.path}


def test_batchnorm_kept_trains_and_folds_exactly_in_the_file(tmp_path, trained, digits):
    """PQAT with batchnorm="keep": BN trains on batch statistics; the converter then folds it
    into the per-channel int8 kernel with no extra op, zeros intact, accuracy as in Keras."""
    (x, y), (xt, yt) = digits
    pruned = compile_model(co.prune(trained, 0.5, verbose=False))  # BN not folded
    pruned.fit(x, y, epochs=1, verbose=0)
    qat = compile_model(co.quantize(co.strip(pruned), verbose=False), lr=3e-4)  # keep: default
    assert scheme_of(qat) == "PQAT"
    assert isinstance(qat.get_layer("conv1_bn"), keras.layers.BatchNormalization)
    assert qat.get_layer("conv1").output_range is None  # the range sits after BN + ReLU
    before = _moving_means(qat)
    qat.fit(x, y, epochs=1, verbose=0)
    assert all(np.abs(a - before[k]).max() > 0 for k, a in _moving_means(qat).items())
    path = co.export_tflite(qat, tmp_path / "pqat_bn.tflite")
    report = co.inspect(path)
    assert report.fully_integer
    assert set(report.operators) <= {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}
    checks = co.verify(path, qat)
    assert all(c.found and c.zeros_lost == 0 for c in checks)
    assert all(t.sparsity >= 0.49 for t in report.tensors)
    keras_acc = qat.evaluate(xt, yt, verbose=0)[1]
    assert abs(co.evaluate_tflite(path, xt, yt) - keras_acc) <= 0.01
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        co.quantize(trained, batchnorm="train", verbose=False)


def test_batchnorm_kept_only_where_the_fold_is_exact(tmp_path, digits):
    """A Dense kernel gets one int8 scale per tensor: its BN is folded even with "keep". A BN
    with no ReLU after it carries the range its folded producer would have had."""
    (x, y), (xt, yt) = digits
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    h = keras.layers.BatchNormalization(momentum=0.9, name="conv_bn")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(32, use_bias=False, name="dense")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="dense_bn")(h)
    h = keras.layers.ReLU(name="dense_relu")(h)
    model = compile_model(keras.Model(inp, keras.layers.Dense(10, name="logits")(h)))
    model.fit(x, y, epochs=2, verbose=0)
    qat = compile_model(co.quantize(model, batchnorm="keep", verbose=False), lr=3e-4)
    assert isinstance(qat.get_layer("dense_bn"), co.quantization.FoldedBatchNorm)
    conv_bn = qat.get_layer("conv_bn")
    assert isinstance(conv_bn.layer, keras.layers.BatchNormalization)
    assert conv_bn.output_range is not None and qat.get_layer("conv").output_range is None
    before = _moving_means(qat)
    qat.fit(x, y, epochs=1, verbose=0)
    moved = {k: np.abs(a - before[k]).max() for k, a in _moving_means(qat).items()}
    assert moved and all(v > 0 for v in moved.values())
    path = co.export_tflite(qat, tmp_path / "mixed.tflite")
    assert co.inspect(path).fully_integer
    keras_acc = qat.evaluate(xt, yt, verbose=0)[1]
    assert abs(co.evaluate_tflite(path, xt, yt) - keras_acc) <= 0.01
