import itertools

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.clustering import INITS, init_centroids, quantization_error
from collabopt.core.structure import detect

from .conftest import assert_unchanged, compile_model, tiny_conv_model, weights_of


def _unique_per_channel(w, axes):
    return detect(w, axes).unique_per_channel_max


@pytest.mark.parametrize("init", INITS)
def test_each_init_bounds_unique(init, digits):
    (x, y), _ = digits
    model = tiny_conv_model()
    clustered = compile_model(co.cluster(model, 6, init=init, verbose=False))
    clustered.fit(x[:128], y[:128], epochs=1, verbose=0)
    plain = co.strip(clustered)
    for name in ("conv", "dw", "pw", "dense"):
        k = plain.get_layer(name).kernel.numpy()
        assert np.unique(k).size <= 6, (init, name)


def test_kmeans1d_is_optimal():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, k = int(rng.integers(6, 12)), int(rng.integers(2, 4))
        v = np.sort(rng.standard_normal(n))
        best = min(sum(((s - s.mean()) ** 2).sum() for s in np.split(v, list(cut)))
                   for cut in itertools.combinations(range(1, n), k - 1))
        assert quantization_error(v, init_centroids(v, k, "kmeans1d")) <= best + 1e-9
    # large enough that every row runs its parallel top levels: against a plain O(k n^2) DP
    for n, k in ((3000, 5), (2000, 16)):
        v = rng.standard_normal(n)
        x = np.sort(v)
        s1, s2 = np.concatenate([[0], np.cumsum(x)]), np.concatenate([[0], np.cumsum(x * x)])
        j, i = np.arange(n)[:, None], np.arange(n)[None, :]
        cost = np.where(j <= i, s2[i + 1] - s2[j] - (s1[i + 1] - s1[j]) ** 2
                        / np.maximum(i - j + 1, 1), np.inf)
        d = cost[0]
        for _ in range(k - 1):
            d = np.min(np.concatenate([[np.inf], d[:-1]])[:, None] + cost, axis=0)
        assert quantization_error(v, init_centroids(v, k, "kmeans1d")) == pytest.approx(
            d[-1], rel=1e-9)
    w = rng.standard_normal(20000)
    errors = {init: quantization_error(w, init_centroids(w, 16, init)) for init in INITS}
    assert errors["kmeans1d"] == min(errors.values())


def test_per_channel_and_depthwise(digits):
    (x, y), _ = digits
    clustered = compile_model(co.cluster(tiny_conv_model(), 4, per_channel=True,
                                         verbose=False))
    clustered.fit(x[:128], y[:128], epochs=1, verbose=0)
    plain = co.strip(clustered)
    assert _unique_per_channel(plain.get_layer("dw").kernel.numpy(), (-2, -1)) <= 4
    assert _unique_per_channel(plain.get_layer("pw").kernel.numpy(), (-1,)) <= 4
    assert _unique_per_channel(plain.get_layer("dense").kernel.numpy(), (-1,)) <= 4
    assert np.unique(plain.get_layer("pw").kernel.numpy()).size > 4  # per channel, not tensor


@pytest.mark.parametrize("per_channel", [False, True])
def test_sparsity_preserved(per_channel, digits):
    (x, y), _ = digits
    pruned = co.strip(co.prune(tiny_conv_model(), 0.5, verbose=False))
    zeros = {n: pruned.get_layer(n).kernel.numpy() == 0 for n in ("conv", "pw", "dense")}
    clustered = co.cluster(pruned, 4, per_channel=per_channel, verbose=False)  # detected
    assert all(t.preserve_sparsity for t in clustered.get_layer("pw").transforms)
    compile_model(clustered).fit(x[:128], y[:128], epochs=1, verbose=0)
    plain = co.strip(clustered)
    for name, z in zeros.items():
        k = plain.get_layer(name).kernel.numpy()
        assert np.all(k[z] == 0)  # every zero kept (survivors may join them: next test)
        axes = (-1,)
        bound = _unique_per_channel(k, axes) if per_channel else np.unique(k).size
        assert bound <= 4


def test_survivors_near_zero_join_the_zeros():
    """With sparsity preserved, 0 is one of the k values: a survivor closer to 0 than to any
    free centroid takes it (tfmot does the same) instead of a far centroid; 4 clusters on the
    MNIST CNN at 75 % sparsity gained 0.5 points from this (docs/BENCHMARKS.md)."""
    rng = np.random.default_rng(0)
    kernel = rng.choice([-1.0, 1.0], size=(16, 8)) * rng.uniform(0.9, 1.1, size=(16, 8))
    kernel[::2] = 0.0  # pruned rows
    kernel[1, :3] = [0.01, -0.02, 0.03]  # survivors near the zeros
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(8, name="dense")(inputs))
    model.get_layer("dense").kernel.assign(kernel)
    plain = co.strip(co.cluster(model, 3, preserve_sparsity=True, init="kmeans1d",
                                verbose=False))
    k = plain.get_layer("dense").kernel.numpy()
    assert np.all(k[::2] == 0)
    np.testing.assert_array_equal(k[1, :3], 0.0)
    assert np.unique(k).size == 3 and np.count_nonzero(k) == np.count_nonzero(kernel) - 3


def test_training_moves_centroids_and_recovers(trained, digits):
    (x, y), (xt, yt) = digits
    base_acc = trained.evaluate(xt, yt, verbose=0)[1]
    clustered = compile_model(co.cluster(trained, 8, verbose=False), lr=5e-4)
    before = clustered.get_layer("conv2").transforms[0].centroids.numpy().copy()
    clustered.fit(x, y, epochs=2, verbose=0)
    after = clustered.get_layer("conv2").transforms[0].centroids.numpy()
    assert not np.allclose(before, after)  # centroids train
    acc = compile_model(co.strip(clustered)).evaluate(xt, yt, verbose=0)[1]
    assert acc >= base_acc - 0.05


def test_fold_batchnorm_equivalent(trained, digits):
    (x, _), _ = digits
    folded = co.fold_batchnorm(trained)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    a, b = trained.predict(x[:64], verbose=0), folded.predict(x[:64], verbose=0)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    ds = co.fold_batchnorm(co.models.ds_cnn("S", classes=10))
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in ds.layers) == 0


def test_folded_per_tensor_codebook_survives_export(tmp_path, trained, digits):
    (x, y), _ = digits
    clustered = compile_model(co.cluster(co.fold_batchnorm(trained), 8, verbose=False))
    clustered.fit(x[:256], y[:256], epochs=1, verbose=0)
    path = co.export_tflite(clustered, tmp_path / "c.tflite", representative_data=x[:100],
                            per_channel_weights=False)
    report = co.inspect(path)
    assert len(report.tensors) == 3
    assert all(t.unique <= 8 for t in report.tensors)
    co.verify(path, clustered)
    # per-channel clustering survives the default per-channel export
    pc = co.cluster(trained, 4, per_channel=True, verbose=False)
    path = co.export_tflite(pc, tmp_path / "pc.tflite", representative_data=x[:100])
    assert all(t.unique_per_channel_max <= 4 for t in co.inspect(path).tensors)


def test_auto_per_channel_only_where_the_file_scales_per_channel(tmp_path, trained, digits):
    """Convs per channel (their codebooks survive the BN fold), Dense per tensor (one scale
    in the file, so one codebook is all it can keep cheaply)."""
    (x, y), _ = digits
    auto = co.cluster(trained, 16, per_channel="auto", verbose=False)  # BN kept: not folded
    dense = co.strip(auto).get_layer("logits").kernel.numpy()
    assert np.unique(dense).size == 16
    # some output channels miss an extreme centroid: per-channel int8 scales would differ
    assert len({float(np.abs(dense[:, c]).max()) for c in range(dense.shape[1])}) > 1
    path = co.export_tflite(auto, tmp_path / "auto.tflite", representative_data=x[:100])
    by_op = {}
    for t in co.inspect(path).tensors:
        by_op.setdefault(t.op, []).append(t)
    assert len(by_op["CONV_2D"]) == 2 and len(by_op["FULLY_CONNECTED"]) == 1
    assert all(t.unique_per_channel_max <= 16 < t.unique for t in by_op["CONV_2D"])
    # export keeps the Dense codebook on one scale (post-training default: per channel)
    assert by_op["FULLY_CONNECTED"][0].unique <= 16
    co.verify(path, auto)
    with pytest.raises(ValueError, match="per_channel must be True, False or"):
        co.cluster(trained, 4, per_channel="yes", verbose=False)


def test_save_load_resume(tmp_path, digits):
    (x, y), _ = digits

    def make():
        keras.utils.set_random_seed(3)
        return compile_model(co.cluster(tiny_conv_model(), 5, verbose=False))

    straight = make()
    straight.fit(x[:96], y[:96], epochs=2, batch_size=16, shuffle=False, verbose=0)
    half = make()
    half.fit(x[:96], y[:96], epochs=1, batch_size=16, shuffle=False, verbose=0)
    half.save(tmp_path / "c.keras")
    resumed = keras.models.load_model(tmp_path / "c.keras", safe_mode=True)
    resumed.fit(x[:96], y[:96], epochs=1, batch_size=16, shuffle=False, verbose=0)
    for name in ("conv", "pw", "dense"):
        np.testing.assert_allclose(straight.get_layer(name).transforms[0].centroids.numpy(),
                                   resumed.get_layer(name).transforms[0].centroids.numpy(),
                                   atol=1e-5)


def test_bad_input(trained):
    before = weights_of(trained)
    with pytest.raises(ValueError, match=">= 2"):
        co.cluster(trained, 1)
    with pytest.raises(ValueError, match=">= 3"):
        co.cluster(trained, 2, preserve_sparsity=True)
    with pytest.raises(ValueError, match="unknown init"):
        co.cluster(trained, 8, init="kmeans")
    with pytest.raises(ValueError, match="not supported"):
        co.cluster(trained, 8, layers=["conv1_bn"])
    with pytest.raises(ValueError, match="distinct values"):
        co.cluster(trained, 200, layers=["conv1"])  # 144 weights
    with pytest.raises(TypeError):
        co.cluster(trained, 8.0)
    assert_unchanged(trained, before)


def test_cluster_appends_to_a_wrapped_chain(digits):
    """Clustering a still-wrapped pruned model appends to its chain (no second wrapper)."""
    (x, y), _ = digits
    pruned = compile_model(co.prune(tiny_conv_model(), 0.5, verbose=False))
    pruned.fit(x[:64], y[:64], epochs=1, verbose=0)
    both = compile_model(co.cluster(pruned, 4, verbose=False))
    layer = both.get_layer("pw")
    assert [type(t).__name__ for t in layer.transforms] == ["PruneMask", "ClusterWeights"]
    assert layer.step.numpy() == pruned.get_layer("pw").step.numpy()
    both.fit(x[:64], y[:64], epochs=1, verbose=0)
    k = co.strip(both).get_layer("pw").kernel.numpy()
    assert abs(np.mean(k == 0) - 0.5) < 0.02 and np.unique(k).size <= 4


def test_kmeans1d_refuses_what_would_not_fit_in_memory():
    v = np.random.default_rng(0).standard_normal(2_000_000)
    with pytest.raises(ValueError, match="GiB of back-pointers.*kmeans\\+\\+"):
        init_centroids(v, 600, "kmeans1d")  # 4.5 GiB of back-pointers
