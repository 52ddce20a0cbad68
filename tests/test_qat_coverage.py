"""QAT puts a range on every tensor the converter makes int8, so QAT models export fully
int8 without calibration data and the file computes what the Keras QAT model computes.

Real data (8x8 digits); the shapes are those of keras.applications (unfused activations,
squeeze-excite, hard-sigmoid written as `x + 3.0` ops, preprocessing layers) and of a keyword
transformer (layer norm, attention).
"""

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.core.wrapper import QuantizedOp
from collabopt.export import ExportError


def _loss(logits=True):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)


def _train(model, data, epochs, lr=3e-3, logits=True):
    model.compile(keras.optimizers.Adam(lr), _loss(logits))
    model.fit(*data, epochs=epochs, batch_size=64, verbose=0)
    return model


def _agreement(path, model, x, ties: bool = True):
    """Same class in the file as in the Keras model. ``ties=False`` leaves out the inputs whose
    two top Keras outputs are equal: a QAT model's outputs sit on the int8 grid, where a tie
    has no class (argmax takes the first), and at most 2 % of inputs may be such ties."""
    keras_out = model.predict(x, verbose=0)
    same = co.predict_tflite(path, x).argmax(1) == keras_out.argmax(1)
    if ties:
        return np.mean(same)
    top2 = np.sort(keras_out, axis=1)[:, -2:]
    decided = top2[:, 1] > top2[:, 0]
    assert decided.mean() >= 0.98, f"{(~decided).sum()} tied inputs"
    return np.mean(same[decided])


def test_unfused_activations_get_their_own_ranges(tmp_path, digits):
    keras.utils.set_random_seed(0)
    train, (xt, _) = digits
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="silu", name="c_silu")(inp)
    s = keras.layers.Conv2D(8, 1, activation="sigmoid", name="c_sigmoid")(x)
    x = keras.layers.Multiply(name="excite")([x, s])
    x = keras.layers.Activation("swish", name="swish")(x)
    x = keras.layers.Conv2D(8, 3, activation="tanh", name="c_tanh")(x)
    x = keras.layers.Conv2D(8, 3, activation="gelu", name="c_gelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, activation="softmax", name="head")(x)
    model = _train(keras.Model(inp, out), train, 5, logits=False)
    qat = _train(co.quantize(model, verbose=False), train, 1, lr=1e-4, logits=False)
    path = co.export_tflite(qat, tmp_path / "act.tflite")  # no calibration data
    report = co.inspect(path)
    assert report.fully_integer, report.non_integer_ops
    assert {"LOGISTIC", "TANH", "GELU", "SOFTMAX"} <= set(report.operators)
    assert _agreement(path, qat, xt) >= 0.99  # measured 100 %
    # the softmax output sits on the grid its int8 kernel requires: scale 1/256, zero -128
    from ai_edge_litert.interpreter import Interpreter

    scale, zero = Interpreter(str(path)).get_output_details()[0]["quantization"]
    assert scale == pytest.approx(1 / 256) and zero == -128
    keras_out = qat.predict(xt, verbose=0)
    assert np.abs(co.predict_tflite(path, xt) - keras_out).max() <= 4 / 256
    loaded = keras.models.load_model(_save(qat, tmp_path))
    np.testing.assert_allclose(loaded.predict(xt, verbose=0), keras_out, atol=1e-6)


def _save(model, tmp_path):
    model.save(tmp_path / "m.keras")
    return tmp_path / "m.keras"


def test_stateless_ops_of_the_graph_get_ranges(tmp_path, digits):
    """MobileNetV3's hard sigmoid is `ReLU(6)(x + 3.0) * (1 / 6)`: keras ops, not layers."""
    keras.utils.set_random_seed(0)
    train, (xt, _) = digits
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, name="conv")(inp)
    gate = keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)
    x = 1.0 - keras.layers.Multiply()([x, gate])  # a constant first
    out = keras.layers.Dense(10, name="head")(keras.layers.Flatten()(x))
    model = _train(keras.Model(inp, out), train, 3)
    qat = _train(co.quantize(model, verbose=False), train, 1, lr=1e-4)
    assert sum(isinstance(op, QuantizedOp) for op in qat.operations) == 3
    path = co.export_tflite(qat, tmp_path / "ops.tflite")
    report = co.inspect(path)
    assert report.fully_integer and {"ADD", "MUL", "SUB"} <= set(report.operators)
    assert _agreement(path, qat, xt) >= 0.99  # measured 100 %
    loaded = keras.models.load_model(_save(qat, tmp_path))
    np.testing.assert_allclose(loaded.predict(xt, verbose=0), qat.predict(xt, verbose=0),
                               atol=1e-6)
    plain = co.strip(qat)  # the ops come back as plain keras ops
    assert not any(isinstance(op, QuantizedOp) for op in plain.operations)
    assert {"Add", "Multiply", "Subtract"} <= {type(op).__name__ for op in plain.operations}


@pytest.fixture(scope="module")
def transformer(digits):
    keras.utils.set_random_seed(0)
    (x, y), _ = digits
    inp = keras.Input((8, 8))
    h = keras.layers.Rescaling(2.0, -1.0, name="scale")(inp)
    h = keras.layers.Dense(16, name="embed")(h)
    a = keras.layers.MultiHeadAttention(2, 8, name="mha")(h, h)
    h = keras.layers.LayerNormalization(name="ln1")(h + a)
    f = keras.layers.Dense(32, activation="gelu", name="ffn1")(h)
    h = keras.layers.LayerNormalization(name="ln2")(h + keras.layers.Dense(16, name="ffn2")(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(h))
    return _train(model, (x[..., 0], y), 8)


def test_layer_norm_and_preprocessing_deploy_fully_int8(tmp_path, transformer, digits):
    (x, y), (xt, _) = digits
    x, xt = x[..., 0], xt[..., 0]
    ptq = co.export_tflite(transformer, tmp_path / "ptq.tflite", representative_data=x)
    assert co.inspect(ptq).fully_integer  # Keras' layer norm holds a NEG, which has no int8
    assert _agreement(ptq, transformer, xt) >= 0.97  # measured 98.9 %
    qat = _train(co.quantize(transformer, verbose=False), (x, y), 1, lr=1e-4)
    # the layer norms' nine ops, the rescaling's two and attention's six carry ranges
    path = co.export_tflite(qat, tmp_path / "qat.tflite")  # no calibration data
    assert co.inspect(path).fully_integer
    assert {"BATCH_MATMUL", "SOFTMAX"} <= set(co.inspect(path).operators)
    # 98.6 % counting every input: of the 5 flips, 3 are exact ties of the QAT model's two top
    # logits on its int8 output grid, 2 differ by one step of it (0.054)
    assert _agreement(path, qat, xt, ties=False) >= 0.99  # measured 99.4 %


def test_a_tensor_qat_cannot_reach_names_its_layer(tmp_path, digits):
    """Masked attention runs Keras' own call (no ranges inside): the export says which layer,
    and calibration data fills the gap."""
    (x, y), _ = digits
    inp = keras.Input((8, 8))
    h = keras.layers.Dense(16, name="embed")(inp)
    h = keras.layers.MultiHeadAttention(2, 8, name="mha")(h, h, use_causal_mask=True)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(
        keras.layers.GlobalAveragePooling1D()(h)))
    qat = _train(co.quantize(model, verbose=False), (x[:256, ..., 0], y[:256]), 1)
    with pytest.raises(ExportError, match=r"\(float\).*'mha'.*representative_data") as err:
        co.export_tflite(qat, tmp_path / "qat.tflite")
    assert {layer for _, layer in err.value.operators} == {"mha"}
    path = co.export_tflite(qat, tmp_path / "qat.tflite", representative_data=x[:64, ..., 0])
    assert co.inspect(path).fully_integer


def test_check_int8_names_the_layer_before_any_training():
    inp = keras.Input((8,))
    h = keras.layers.Dense(8, name="proj")(inp)
    good = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    assert co.check_int8(good) == []
    out = keras.layers.Lambda(lambda t: keras.ops.arctan2(t, t + 1.0), name="angle")(h)
    problems = co.check_int8(keras.Model(inp, out))
    assert problems and {layer for _, layer in problems} == {"angle"}
    assert any("ATAN2" in op for op, _ in problems)


def test_a_subclassed_model_exports_after_qat(tmp_path, digits):
    from collabopt.zoo import SubclassedNet

    (x, y), (xt, _) = digits
    model = SubclassedNet()
    model(x[:1])
    qat = _train(co.quantize(model, verbose=False), (x, y % 4), 1)
    path = co.export_tflite(qat, tmp_path / "sub.tflite", representative_data=x)
    assert co.inspect(path).fully_integer
    assert _agreement(path, qat, xt) >= 0.95


def test_layer_norm_qat_of_a_constant_token_keeps_finite_gradients():
    """A token whose features are all equal has variance 0: its ``variance + epsilon`` rounds
    to 0 on a range set by the other tokens, and rsqrt(0) = inf once gave NaN gradients (a
    trained keyword transformer's QAT diverged at its 8th step)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((2, 8))
    h = keras.layers.Dense(8, name="embed")(inp)  # zero bias: a zero token stays constant
    h = keras.layers.LayerNormalization(name="ln")(h)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 30, (64, 8)), np.zeros((64, 8))], axis=1).astype("float32")
    y = rng.integers(0, 2, 64)
    qat = co.quantize(model, verbose=False)
    qat.compile(keras.optimizers.Adam(1e-3),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(np.isfinite(np.asarray(v)).all() for v in qat.weights)
