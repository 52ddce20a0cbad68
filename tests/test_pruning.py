import keras
import numpy as np
import pytest
import tensorflow as tf

import collabopt as co
from collabopt.core.wrapper import OptimizedLayer

from .conftest import assert_unchanged, compile_model, tiny_conv_model, weights_of


def _kernels(model):
    return {layer.name: layer.get_weights()[0] for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense,
                                  keras.layers.DepthwiseConv2D))}


def test_constant_sparsity_fit_strip(digits):
    (x, y), _ = digits
    base = tiny_conv_model()
    before = weights_of(base)
    pruned = compile_model(co.prune(base, 0.5, verbose=False))
    pruned.fit(x[:256], y[:256], epochs=1, batch_size=32, verbose=0)
    plain = co.strip(pruned)
    assert [type(layer) for layer in plain.layers] == [type(layer) for layer in base.layers]
    assert [layer.name for layer in plain.layers] == [layer.name for layer in base.layers]
    for name, k in _kernels(plain).items():
        assert abs(np.mean(k == 0) - 0.5) < 0.02, name
        wrapper = pruned.get_layer(name)
        assert list(wrapper.chains) == ["kernel"]  # biases are never pruned
        np.testing.assert_array_equal(plain.get_layer(name).bias.numpy(),
                                      wrapper.layer.bias.numpy())
    assert_unchanged(base, before)  # the input model is never mutated
    assert not any(isinstance(layer, OptimizedLayer) for layer in base.layers)


def test_polynomial_schedule_custom_loop():
    """Masks follow the schedule, counted by the wrapper itself in a plain GradientTape loop."""
    model = tiny_conv_model()
    schedule = co.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=10, frequency=2)
    pruned = co.prune(model, schedule, verbose=False)
    opt = keras.optimizers.SGD(0.01)
    x = np.random.default_rng(0).random((8, 8, 8, 1), dtype=np.float32)
    sparsities = []
    for _ in range(14):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(pruned(x, training=True) ** 2)
        grads = tape.gradient(loss, pruned.trainable_variables)
        opt.apply_gradients(zip(grads, pruned.trainable_variables, strict=True))
        sparsities.append(float(np.mean(co.strip(pruned).get_layer("pw").kernel.numpy() == 0)))
    assert pruned.get_layer("pw").step.numpy() == 14
    assert sparsities[0] == 0.0
    assert all(b >= a - 1e-9 for a, b in zip(sparsities, sparsities[1:], strict=False))
    assert abs(sparsities[-1] - 0.8) < 0.02
    assert sparsities[10] == sparsities[-1]  # frozen after end_step


@pytest.mark.parametrize("m,n", [(2, 4), (1, 3)])
def test_m_by_n(m, n):
    model = tiny_conv_model()
    plain = co.strip(co.prune(model, m_by_n=(m, n), verbose=False))
    dense = plain.get_layer("dense").kernel.numpy()  # (16, 10): groups along the inputs
    groups = (dense != 0)[: 16 - 16 % n].reshape(-1, n, 10)
    assert np.all(groups.sum(axis=1) == m)
    pw = plain.get_layer("pw").kernel.numpy()  # (1, 1, 8, 16): groups along input channels
    pw_groups = (pw[0, 0] != 0)[: 8 - 8 % n].reshape(-1, n, 16)
    assert np.all(pw_groups.sum(axis=1) == m)


def _coverage_models():
    L = keras.layers
    out = {}
    i1 = keras.Input((16, 4))
    h = L.Conv1D(8, 3, name="c1d")(i1)
    h = L.DepthwiseConv1D(3, name="dw1d")(h)
    h = L.SeparableConv1D(8, 3, name="sep1d")(h)
    h = L.Conv1DTranspose(8, 3, name="ct1d")(h)
    out["1d"] = keras.Model(i1, L.Dense(4, name="d1")(L.Flatten()(h)))
    i2 = keras.Input((12, 12, 3))
    h = L.Conv2D(8, 3, name="c2d")(i2)
    h = L.SeparableConv2D(8, 3, name="sep2d")(h)
    h = L.Conv2DTranspose(8, 3, name="ct2d")(h)
    out["2d"] = keras.Model(i2, L.EinsumDense("abcd,de->abce", (10, 10, 6), name="ein")(h))
    i3 = keras.Input((6, 6, 6, 2))
    h = L.Conv3D(8, 3, name="c3d")(i3)
    out["3d"] = keras.Model(i3, L.Conv3DTranspose(4, 3, name="ct3d")(h))
    ie = keras.Input((5,), dtype="int32")
    out["emb"] = keras.Model(ie, L.Dense(8, name="de")(L.Embedding(50, 8, name="emb")(ie)))
    return out


@pytest.mark.parametrize("kind", ["1d", "2d", "3d", "emb"])
def test_layer_coverage(kind):
    model = _coverage_models()[kind]
    pruned = co.prune(model, 0.6, verbose=False)
    wrapped = [layer.name for layer in pruned.layers if isinstance(layer, OptimizedLayer)]
    plain = co.strip(pruned)
    for name in wrapped:
        layer = plain.get_layer(name)
        for w in layer.weights:
            if "bias" in w.path:
                continue
            assert abs(np.mean(w.numpy() == 0) - 0.6) < 0.05, (name, w.path)
    assert len(wrapped) >= 2


def test_model_kinds(digits):
    """Sequential, nested, residual, shared layers and a subclassed model."""
    L = keras.layers
    seq = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(8, 3, name="a"), L.Flatten(),
                            L.Dense(10, name="b")])
    inp = keras.Input((8, 8, 1))
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    h = L.Add()([shared(inp), shared(inp * 2.0)])  # one layer, two call sites
    inner = keras.Sequential([L.Flatten(), L.Dense(16, name="inner_dense")], name="inner")
    nested = keras.Model(inp, L.Dense(10, name="head")(inner(h)))

    @keras.saving.register_keras_serializable(package="tests")
    class Sub(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.conv = L.Conv2D(8, 3, name="sub_conv")
            self.flat = L.Flatten()
            self.out = L.Dense(10, name="sub_dense")

        def call(self, x):
            return self.out(self.flat(self.conv(x)))

    sub = Sub()
    sub(np.zeros((1, 8, 8, 1), "float32"))
    (x, y), _ = digits
    for model, names in ((seq, ["a", "b"]), (nested, ["shared", "inner_dense", "head"]),
                         (sub, ["sub_conv", "sub_dense"])):
        ref = model.predict(x[:4], verbose=0)
        pruned = compile_model(co.prune(model, 0.5, verbose=False))
        pruned.fit(x[:64], y[:64], epochs=1, verbose=0)
        plain = co.strip(pruned)
        kernels = [layer.kernel.numpy() for layer in co.core.rewrite.iter_layers(plain)
                   if hasattr(layer, "kernel") and layer.name in names]
        assert len(kernels) == len(names)
        assert all(abs(np.mean(k == 0) - 0.5) < 0.1 for k in kernels)
        np.testing.assert_allclose(model.predict(x[:4], verbose=0), ref)  # original intact
    assert pruned.collabopt_summary.wrapped == ["sub_conv", "sub_dense"]


def test_save_load_resume_identical(tmp_path, digits):
    (x, y), _ = digits
    schedule = co.PolynomialDecay(0.2, 0.7, begin_step=0, end_step=8, frequency=2)

    def make():
        keras.utils.set_random_seed(1)
        return compile_model(co.prune(tiny_conv_model(), schedule, verbose=False))

    straight = make()
    straight.fit(x[:160], y[:160], epochs=2, batch_size=16, shuffle=False, verbose=0)
    half = make()
    half.fit(x[:160], y[:160], epochs=1, batch_size=16, shuffle=False, verbose=0)
    half.save(tmp_path / "half.keras")
    resumed = keras.models.load_model(tmp_path / "half.keras", safe_mode=True)
    assert resumed.get_layer("pw").step.numpy() == 10
    resumed.fit(x[:160], y[:160], epochs=1, batch_size=16, shuffle=False, verbose=0)
    for name in ("conv", "dw", "pw", "dense"):
        a = straight.get_layer(name).transforms[0].mask.numpy()
        b = resumed.get_layer(name).transforms[0].mask.numpy()
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(straight.get_weights()[0], resumed.get_weights()[0], atol=1e-5)


def test_zeros_survive_int8_export(tmp_path, trained, digits):
    (x, y), _ = digits
    pruned = compile_model(co.prune(trained, 0.6, verbose=False))
    pruned.fit(x, y, epochs=1, verbose=0)
    plain = co.strip(pruned)
    path = co.export_tflite(plain, tmp_path / "p.tflite", representative_data=x[:100])
    report = co.inspect(path)
    by_layer = {t.layer: t for t in report.tensors}
    k = plain.get_layer("conv2").kernel.numpy()  # Keras (3, 3, 16, 32) -> TFLite (32, 3, 3, 16)
    file_k = by_layer["conv2"].values
    np.testing.assert_array_equal(np.moveaxis(k, -1, 0) == 0, file_k == 0)
    checks = co.verify(path, plain)
    assert all(c.found and c.zeros_lost == 0 for c in checks)


def test_bad_input(trained):
    L = keras.layers
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        co.prune(trained, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        co.prune(trained, -0.1)
    with pytest.raises(ValueError, match="0 < m < n"):
        co.prune(trained, m_by_n=(4, 4))
    with pytest.raises(ValueError, match="end_step"):
        co.PolynomialDecay(0.0, 0.5, begin_step=10, end_step=5)
    with pytest.raises(ValueError, match="contradicts"):
        co.prune(trained, 0.3, m_by_n=(2, 4))
    with pytest.raises(TypeError, match="sparsity"):
        co.prune(trained, "half")
    unbuilt = keras.Sequential([L.Dense(4)])
    with pytest.raises(ValueError, match="not built"):
        co.prune(unbuilt, 0.5)
    nothing = keras.Sequential([keras.Input((4,)), L.ReLU()])
    with pytest.raises(ValueError, match="nothing to optimize"):
        co.prune(nothing, 0.5)
    with pytest.raises(ValueError, match="not supported"):
        co.prune(trained, 0.5, layers=["conv1_bn"])
    with pytest.raises(ValueError, match="not found"):
        co.prune(trained, 0.5, layers=["no_such_layer"])


def test_layers_selector_and_summary(trained, capsys):
    pruned = co.prune(trained, 0.5, layers=keras.layers.Dense)
    assert pruned.collabopt_summary.wrapped == ["logits"]
    assert "wrapped 1 layer(s) [logits]" in capsys.readouterr().out
    pruned = co.prune(trained, 0.5, layers=lambda layer: layer.name.startswith("conv"),
                      verbose=False)
    assert pruned.collabopt_summary.wrapped == ["conv1", "conv2"]


def test_all_except_skips_by_name_or_class():
    from collabopt.core.rewrite import AllExcept

    model = tiny_conv_model()
    pruned = co.prune(model, 0.5, layers=AllExcept(("DepthwiseConv2D", "dense")), verbose=False)
    assert pruned.collabopt_summary.wrapped == ["conv", "pw"]
    assert AllExcept(("DepthwiseConv2D", "dens", "Conv")).unknown(model) == ["dens", "Conv"]


def test_keep_zeros_holds_a_pruned_layer_that_clustering_leaves_alone(trained, digits):
    """prune -> cluster(layers=[conv2]): conv1 is not clustered, so nothing held its zeros
    through the cluster fine-tune; keep_zeros does, at the same positions."""
    (x, y), _ = digits
    pruned = co.prune(trained, sparsity=co.ConstantSparsity(0.6), verbose=False)
    compile_model(pruned).fit(x[:256], y[:256], epochs=1, batch_size=64, verbose=0)
    pruned = co.strip(pruned)
    zeros = pruned.get_layer("conv1").kernel.numpy() == 0
    assert zeros.mean() == pytest.approx(0.6, abs=0.01)

    def cluster_then_fit(keep):
        model = co.cluster(pruned, 8, layers=["conv2"], verbose=False)
        if keep:
            model = co.pruning.keep_zeros(model, layers=lambda layer: not isinstance(
                layer, OptimizedLayer))
        compile_model(model, lr=3e-3).fit(x[:512], y[:512], epochs=1, batch_size=64,
                                          verbose=0)
        return co.strip(model).get_layer("conv1").kernel.numpy()

    assert (cluster_then_fit(keep=False)[zeros] != 0).mean() > 0.5  # the zeros refill
    kept = cluster_then_fit(keep=True)
    np.testing.assert_array_equal(kept == 0, zeros)
    model = co.pruning.keep_zeros(trained, verbose=False)  # nothing sparse: the model itself
    assert model is trained
