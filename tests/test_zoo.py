"""Every layer of every model: prune, cluster, strip, save and resume on the models users
bring (``collabopt.zoo``: keras.applications networks, RNN and attention keyword spotters,
Conv1D audio and text nets, a user's residual block, a subclassed model).

Each check reads the weights back from the stripped model for every kernel the registry
knows (recurrent kernels, attention projections and kernels inside user layers included).
Training steps run eagerly: tracing a MobileNet graph costs ~20 s, one eager step ~1 s.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.core import registry
from collabopt.core.rewrite import iter_layers
from collabopt.zoo import ZOO

from .conftest import tiny_conv_model

K = 4  # clusters
PRUNED: dict[str, keras.Model] = {}  # each model's pruned, stripped copy (reused, saves a wrap)


def fit(model, x, y, steps=1):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    model.fit(x[: 2 * steps], y[: 2 * steps], batch_size=2, epochs=1, verbose=0)
    return model


def kernels(model):
    """{layer/weight: value} for every registry-known weight big enough to be wrapped."""
    out = {}
    for layer in iter_layers(model):
        for spec in registry.weight_specs(layer) or ():
            w = registry.find_variable(layer, spec.name).numpy()
            out[f"{layer.name}/{spec.name}"] = (w, spec)
    return out


def wrapped_weights(model):
    return {f"{layer.name}/{name}" for layer in iter_layers(model)
            if isinstance(layer, co.core.wrapper.OptimizedLayer) for name in layer.chains}


def state(model):
    """Masks, centroids and step counters of every wrapper, in order."""
    return [(v.name, v.numpy()) for v in model.weights
            if any(k in v.path for k in ("mask", "centroids", "step"))]


def groups_ok(w, spec, m, n):
    rank = w.ndim
    red = [a % rank for a in spec.reduction_axes]
    rest = [a for a in range(rank) if a not in red]
    flat = np.transpose(w, rest + red).reshape(int(np.prod([w.shape[a] for a in rest])), -1)
    pad = (-flat.shape[1]) % n
    flat = np.pad(flat, [(0, 0), (0, pad)]).reshape(flat.shape[0], -1, n)
    return int(np.count_nonzero(flat, axis=-1).max()) <= m


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_model(request):
    keras.utils.set_random_seed(0)
    return request.param, *ZOO[request.param]()


def test_prune_every_kernel_save_and_resume(zoo_model, tmp_path, capsys):
    name, model, x, y = zoo_model
    schedule = co.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=1, frequency=1)
    pruned = co.prune(model, schedule)
    printed = capsys.readouterr().out
    assert "collabopt.prune: wrapped" in printed and "skipped" in printed
    known = kernels(model)
    wrapped = wrapped_weights(pruned)
    # nothing the registry knows is left out unless it is tiny (and then it says so)
    for key, (w, _) in known.items():
        layer = key.split("/")[0]
        assert key in wrapped or (w.size < 32 and layer in pruned.collabopt_summary.skipped), key
    fit(pruned, x, y, steps=1)
    if name == "subclassed":  # Keras cannot revive it from a config: weights round-trip
        pruned.save_weights(tmp_path / "mid.weights.h5")
        loaded = co.prune(model, schedule, verbose=False)
        loaded.load_weights(tmp_path / "mid.weights.h5")
    else:
        pruned.save(tmp_path / "mid.keras")
        loaded = keras.models.load_model(tmp_path / "mid.keras", safe_mode=True)
    before, after = state(pruned), state(loaded)
    assert before and [n for n, _ in after] == [n for n, _ in before]
    assert any(n == "step" and v == 1 for n, v in before)  # one step was taken
    for (name, value), (_, got) in zip(before, after, strict=True):
        np.testing.assert_array_equal(got, value, err_msg=name)
    fit(loaded, x, y, steps=1)  # resumes at step 1, where the schedule reaches 50 %
    plain = co.strip(loaded)
    assert not co.core.rewrite.is_wrapped(plain)
    for key, (w, _) in kernels(plain).items():
        if key in wrapped:
            assert abs((w == 0).mean() - 0.5) < 0.05, (key, (w == 0).mean())
    PRUNED[name] = plain  # the next tests cluster it


def test_two_four_sparsity(zoo_model):
    name, model, x, y = zoo_model
    pruned = co.prune(model, m_by_n=(2, 4), verbose=False)  # the mask is set at wrap time
    wrapped = wrapped_weights(pruned)
    plain = co.strip(pruned)
    checked = 0
    for key, (w, spec) in kernels(plain).items():
        if key in wrapped:
            assert groups_ok(w, spec, 2, 4), key
            checked += 1
    assert checked == len(wrapped) > 0


def test_cluster_per_tensor_save_and_resume(zoo_model, tmp_path):
    name, model, x, y = zoo_model
    clustered = fit(co.cluster(model, K, init="linear", verbose=False), x, y)
    wrapped = wrapped_weights(clustered)
    if name != "subclassed":  # (Keras cannot revive that one from a config)
        clustered.save(tmp_path / "mid.keras")
        loaded = keras.models.load_model(tmp_path / "mid.keras", safe_mode=True)
        for (n, value), (_, got) in zip(state(clustered), state(loaded), strict=True):
            np.testing.assert_array_equal(got, value, err_msg=n)  # centroids and steps
        clustered = loaded
    plain = co.strip(fit(clustered, x, y))
    nested_bn = {layer.name for layer in iter_layers(clustered)
                 if co.batchnorm.holds_batchnorm(co.core.rewrite.host_layer(layer))}
    for key, (w, spec) in kernels(plain).items():
        if key in wrapped:
            rows = registry.channels_first_2d_np(w, spec.channel_axes)
            assert max(np.unique(r).size for r in rows) <= K, key
            if key.split("/")[0] not in nested_bn:  # those are clustered per channel
                assert np.unique(w).size <= K, key
    assert len([k for k in kernels(plain) if k in wrapped]) == len(wrapped) > 0


def test_cluster_per_channel_keeps_zeros(zoo_model):
    name, model, x, y = zoo_model
    pruned = PRUNED.get(name) or co.strip(co.prune(model, 0.5, verbose=False))
    zeros = {k: w == 0 for k, (w, _) in kernels(pruned).items() if (w == 0).mean() > 0.4}
    assert zeros
    clustered = co.cluster(pruned, K, per_channel=True, init="linear", verbose=False)
    plain = co.strip(fit(clustered, x, y))
    for key, (w, spec) in kernels(plain).items():
        if key in zeros:
            assert (w[zeros[key]] == 0).all(), key  # every zero kept (survivors may join)
            rows = registry.channels_first_2d_np(w, spec.channel_axes)
            assert max(np.unique(r).size for r in rows) <= K, key


def test_rnn_and_attention_weights_are_all_reached():
    """The weights tfmot prunes and clusters, by path: both RNN kernels of each direction,
    the four attention projections, the convs inside a user's block."""
    expect = {
        "lstm_kws": {"lstm/cell.kernel", "lstm/cell.recurrent_kernel"},
        "gru_kws": {"gru1/cell.kernel", "gru1/cell.recurrent_kernel",
                    "bigru/forward_layer.cell.kernel", "bigru/forward_layer.cell.recurrent_kernel",
                    "bigru/backward_layer.cell.kernel",
                    "bigru/backward_layer.cell.recurrent_kernel"},
        "keyword_transformer": {f"mha/_{p}_dense.kernel" for p in
                                ("query", "key", "value", "output")},
        "custom_block": {"block/conv_a.kernel", "block/conv_b.kernel"},
    }
    for name, paths in expect.items():
        model = ZOO[name]()[0]
        assert paths <= wrapped_weights(co.prune(model, 0.5, verbose=False)), name


def test_stacked_cells_in_rnn():
    inp = keras.Input((6, 4))
    cells = [keras.layers.LSTMCell(8), keras.layers.SimpleRNNCell(8)]
    out = keras.layers.RNN(keras.layers.StackedRNNCells(cells), name="rnn")(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(out))
    plain = co.strip(co.cluster(model, 3, verbose=False))
    got = {k: np.unique(w).size for k, (w, _) in kernels(plain).items()}
    assert {"rnn/cell.cells.0.kernel", "rnn/cell.cells.1.recurrent_kernel"} <= got.keys()
    assert max(v for k, v in got.items() if k.startswith("rnn/")) <= 3


def test_copy_never_depends_on_compile():
    model, x, y = ZOO["text_cnn"]()
    model.compile("adam", lambda a, b: keras.ops.mean((b - keras.ops.cast(a, b.dtype)) ** 2),
                  metrics=[lambda a, b: keras.ops.mean(b)])
    for make in (lambda: co.prune(model, 0.5, verbose=False),
                 lambda: co.cluster(model, K, verbose=False)):
        assert not make().compiled  # a lambda does not serialize: returned uncompiled
    model.compile("adam", "mse")
    copy = co.prune(model, 0.5, verbose=False)
    assert copy.compiled and copy.loss == "mse"  # serializable settings are kept


@co.register_layer(co.WeightSpec("kernel", channel_axes=(-1,), reduction_axes=(0,),
                                 int8_per_channel=False))
@keras.saving.register_keras_serializable(package="test_zoo")
class OwnDense(keras.layers.Layer):
    """A user's layer that owns its kernel: one declaration serves every technique."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) + self.bias

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_register_layer_serves_every_technique(tmp_path, digits):
    (x, y), _ = digits
    x = x.reshape(len(x), -1)[:64]
    y = y[:64]
    inp = keras.Input((64,))
    out = keras.layers.Dense(10, name="head")(keras.layers.ReLU()(OwnDense(32, name="own")(inp)))
    model = keras.Model(inp, out)
    pruned = co.strip(fit(co.prune(model, 0.5, verbose=False), x, y))
    own = pruned.get_layer("own").kernel.numpy()
    assert abs((own == 0).mean() - 0.5) < 0.02
    clustered = co.cluster(pruned, K, verbose=False)
    clustered.save(tmp_path / "c.keras")
    clustered = co.strip(keras.models.load_model(tmp_path / "c.keras", safe_mode=True))
    own_c = clustered.get_layer("own").kernel.numpy()
    assert np.unique(own_c).size <= K and (own_c[own == 0] == 0).all()
    qat = fit(co.quantize(clustered, verbose=False), x, y)
    assert co.quantization.scheme_of(qat) == "PCQAT"
    assert "own" in qat.collabopt_summary.wrapped
    path = co.export_tflite(co.strip(clustered), tmp_path / "own.tflite", representative_data=x)
    co.verify(path, co.strip(clustered))


def test_register_layer_rejects_bad_declarations():
    with pytest.raises(TypeError, match="Layer subclass"):
        co.register_layer(int, co.WeightSpec("kernel", (-1,), (0,)))
    with pytest.raises(TypeError, match="WeightSpec"):
        co.register_layer(OwnDense, "kernel")


def test_cluster_folds_batchnorm_so_codebooks_survive_export(tmp_path, capsys):
    model, x, _ = ZOO["MobileNetV2"]()
    clustered = co.strip(co.cluster(model, K, init="linear"))
    assert "folded batch norm" in capsys.readouterr().out
    path = co.export_tflite(clustered, tmp_path / "mnv2.tflite", representative_data=x)
    checks = co.verify(path, clustered)  # defaults only: no fold call, no export flag
    assert len(checks) >= 50


def test_cluster_keep_batchnorm_refuses_with_the_fix():
    model = ZOO["conv1d_audio"]()[0]
    with pytest.raises(ValueError, match=r"per_channel=True .*batchnorm=\"fold\""):
        co.cluster(model, K, batchnorm="keep", verbose=False)
    pruned = co.prune(model, 0.5, verbose=False)  # wrapped: cannot be folded before a strip
    with pytest.raises(ValueError, match="strip"):
        co.cluster(pruned, K, verbose=False)
    co.cluster(model, K, per_channel=True, batchnorm="keep", verbose=False)  # exact: allowed


def test_plain_cnn_codebooks_survive_default_export(tmp_path, digits):
    """No batch norm: per-tensor conv codebooks used to get per-channel scales by default."""
    (x, y), _ = digits
    model = tiny_conv_model()
    clustered = co.strip(fit(co.cluster(model, K, verbose=False), x, y))
    path = co.export_tflite(clustered, tmp_path / "cnn.tflite", representative_data=x[:64])
    checks = co.verify(path, clustered)
    assert {c.layer for c in checks} >= {"conv", "dw", "pw"}


def test_custom_block_copies_and_loads_when_nothing_inside_is_optimized(tmp_path):
    model, x, y = ZOO["custom_block"]()
    pruned = fit(co.prune(model, 0.5, layers=["head"], verbose=False), x, y)
    assert wrapped_weights(pruned) == {"head/kernel"}
    pruned.save(tmp_path / "p.keras")
    loaded = keras.models.load_model(tmp_path / "p.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), pruned.predict(x, verbose=0),
                               atol=1e-5)


def test_attention_projection_axes_follow_the_equation():
    """Per-channel codebooks and m:n groups of MHA kernels lie along the right axes: the
    query kernel (dim, heads, key_dim) outputs heads x key_dim channels, the output kernel
    (heads, key_dim, dim) sums over heads and key_dim."""
    mha = keras.layers.MultiHeadAttention(2, 4, name="mha")
    x = keras.Input((5, 8))
    mha(x, x)
    specs = {s.name: s for s in registry.weight_specs(mha)}
    assert (specs["_query_dense.kernel"].channel_axes,
            specs["_query_dense.kernel"].reduction_axes) == ((-2, -1), (0,))
    assert (specs["_output_dense.kernel"].channel_axes,
            specs["_output_dense.kernel"].reduction_axes) == ((-1,), (0, 1))


@keras.saving.register_keras_serializable(package="test_zoo")
class AttentionBlock(keras.layers.Layer):
    """A user's transformer block two levels deep: attention, a norm, and a block that
    itself holds layers."""

    def __init__(self, dim=8, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.attention = keras.layers.MultiHeadAttention(2, dim // 2)
        self.norm = keras.layers.LayerNormalization()
        self.ffn = Feedforward(dim)

    def call(self, x):
        return self.ffn(self.norm(x + self.attention(x, x)))

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="test_zoo")
class Feedforward(keras.layers.Layer):
    def __init__(self, dim=8, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.layers_ = [keras.layers.Dense(2 * dim, activation="relu"), keras.layers.Dense(dim)]

    def call(self, x):
        for layer in self.layers_:
            x = layer(x)
        return x

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def test_layers_nested_two_deep_in_user_layers(tmp_path):
    inp = keras.Input((6, 8))
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(
        AttentionBlock(8, name="blk")(inp)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 6, 8)).astype("float32"), rng.integers(0, 3, (4, 6))
    clustered = fit(co.cluster(co.strip(co.prune(model, 0.5, verbose=False)), K,
                               init="linear", verbose=False), x, y)
    expect = {f"blk/attention._{p}_dense.kernel" for p in ("query", "key", "value", "output")}
    expect |= {"blk/ffn.layers_.0.kernel", "blk/ffn.layers_.1.kernel"}
    assert expect <= wrapped_weights(clustered)
    clustered.save(tmp_path / "blk.keras")
    loaded = keras.models.load_model(tmp_path / "blk.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), clustered.predict(x, verbose=0),
                               atol=1e-5)
    for key, (w, _) in kernels(co.strip(loaded)).items():
        if key in expect:
            assert np.unique(w).size <= K and (w == 0).mean() >= 0.45, key


def test_settle_batchnorm_sets_the_mean_of_batch_statistics_at_any_depth():
    """A short run with momentum 0.999 leaves moving statistics near their initial values
    (MobileNetV3Small answered one class for every image): settling sets them to the mean
    over the batches, inside a user's block too, and restores the momentum."""
    model, x, _ = ZOO["custom_block"](n=12)
    block = model.get_layer("block")
    bn = block.bn_a  # an attribute of a user's layer, not in model.layers
    bn.momentum = 0.999
    batches = [x[:4], x[4:8], x[8:]]
    stem = keras.Model(model.inputs, model.get_layer("stem").output)
    means = [np.asarray(block.conv_a(stem(b))).mean(axis=(0, 1, 2)) for b in batches]
    co.zoo.settle_batchnorm(model, batches)
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, axis=0), atol=1e-5)
    assert bn.momentum == 0.999
