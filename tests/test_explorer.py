"""The explorer for any task and any settings: a metric of the user's choice scored on the
Keras nodes and on the int8 files alike, settings lists with shared parents, stopping at the
mildest settings that meet the targets, and the tree drawn in the report."""

import json

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.inspection import predict_tflite
from collabopt.tree import leaf_names


def _fit_kw():
    return {"epochs": 1, "batch_size": 64, "verbose": 0}


@pytest.fixture(scope="module")
def regressor(digits):
    """8x8 digits -> the digit as a number (mean squared error, lower is better)."""
    (x, y), _ = digits
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(32, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(1, name="value")(h))
    model.compile(keras.optimizers.Adam(3e-3), "mse")
    model.fit(x, y.astype("float32"), epochs=20, batch_size=32, verbose=0)
    return model


def test_regression_tree_scores_files_with_the_metric(tmp_path, regressor, digits):
    (x, y), (xt, yt) = digits
    tree = co.DeploymentTree(
        regressor, (x[:600], y[:600].astype("float32")), (xt, yt.astype("float32")),
        compile={"optimizer": keras.optimizers.Adam(3e-4), "loss": "mse"}, fit=_fit_kw(),
        metric="mse", targets=co.Targets(max_metric_drop=0.5), latency_runs=3,
        vela_accelerator=None)
    result = tree.explore(tmp_path / "run", paths=["PTQ", "QAT", "prune → PTQ"],
                          log=print)
    assert result.metric == "mse" and result.higher_is_better is False
    base_mse = float(np.mean((regressor.predict(xt, verbose=0)[:, 0] - yt) ** 2))
    assert result.baseline["fp32_metric"] == pytest.approx(base_mse, rel=1e-4)
    assert base_mse < 2.0  # the regressor learned something: predicting the mean gives ~8
    for row in result.rows:
        file_mse = float(np.mean((predict_tflite(row["file"], xt)[:, 0] - yt) ** 2))
        assert row["int8_metric"] == pytest.approx(file_mse, rel=1e-4), row["path"]
        assert "int8_accuracy" not in row and row["agreement"] is None
        assert row["output_error"] < 0.1
        # lower is better: a leaf meets the target when its error is at most 0.5 above
        assert row["meets_targets"] == (row["int8_metric"] - base_mse <= 0.5)
    best = min((r for r in result.rows if r["meets_targets"]),
               key=lambda r: r["zip_bytes"], default=None)
    assert result.recommended == (best["path"] if best else None)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Metric: mse (lower is better)" in md and "| INT8 mse |" in md
    assert "max mse drop = 0.5" in md and "tree.png" in md
    assert "Mse vs zipped size" in md


def test_autoencoder_tree_with_reconstruction_error_and_auc(tmp_path, digits):
    """The MLPerf Tiny anomaly-detection shape (dense autoencoder, batch norm, ReLU), trained
    on digits 0-4; digits 5-9 are the anomalies, scored by reconstruction error."""
    (x, y), (xt, yt) = digits
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    normal = flat[y < 5]
    keras.utils.set_random_seed(2)
    inp = keras.Input((64,))
    h = inp
    for i, units in enumerate((32, 32, 8, 32, 32)):
        h = keras.layers.Dense(units, name=f"dense{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU()(h)
    ae = keras.Model(inp, keras.layers.Dense(64, name="out")(h))
    ae.compile(keras.optimizers.Adam(3e-3), "mse")
    ae.fit(normal, normal, epochs=15, batch_size=32, verbose=0)
    anomalous = (yt >= 5).astype(int)

    def auc(y_true, y_pred):  # y_true: the inputs to reconstruct
        from sklearn.metrics import roc_auc_score

        return roc_auc_score(anomalous, np.mean((y_true - y_pred) ** 2, axis=1))

    kw = dict(compile={"optimizer": keras.optimizers.Adam(1e-4), "loss": "mse"},
              fit=_fit_kw(), latency_runs=3, vela_accelerator=None)
    with pytest.raises(ValueError, match="higher_is_better"):  # a name says nothing
        co.DeploymentTree(ae, (normal, normal), (flat_t, flat_t),
                          metric=lambda t, p: auc(t, p), **kw)
    tree = co.DeploymentTree(ae, (normal, normal), (flat_t, flat_t), metric=auc,
                             targets=co.Targets(max_metric_drop=0.05), **kw)
    result = tree.explore(tmp_path / "auc", paths=["PTQ", "QAT"], log=print)
    assert result.higher_is_better  # known from the function's name
    assert result.baseline["fp32_metric"] > 0.75  # it tells anomalies from normal digits
    for row in result.rows:
        assert row["int8_metric"] == pytest.approx(
            auc(flat_t, predict_tflite(row["file"], flat_t)), abs=1e-9)
        assert row["int8_metric"] > 0.7 and row["agreement"] is not None
    assert "| INT8 auc |" in (tmp_path / "auc" / "report.md").read_text()
    mae = co.DeploymentTree(ae, (normal, normal), (flat_t, flat_t), metric="mae", **kw).metric
    assert mae.higher_is_better is False and mae.score(flat_t, flat_t + 0.5) == pytest.approx(
        0.5)


def test_targets_metric_drop_in_both_directions():
    assert co.Targets(max_accuracy_drop=0.01).max_metric_drop == 0.01
    with pytest.raises(ValueError, match="same limit"):
        co.Targets(max_accuracy_drop=0.01, max_metric_drop=0.02)
    t = co.Targets(max_metric_drop=0.1)
    row = {"int8_metric": 1.05, "zip_bytes": 1, "latency_ms": 1.0}
    assert t.failures(row, 1.0, higher_is_better=False) == []  # error 0.05 above the base
    assert t.failures({**row, "int8_metric": 1.2}, 1.0, higher_is_better=False) == ["metric"]
    assert t.failures({**row, "int8_metric": 0.85}, 1.0) == ["metric"]  # 0.15 below
    assert t.failures({**row, "int8_metric": 1.2}, 1.0) == []  # better than the base


def test_settings_lists_share_parents(tmp_path, trained, digits):
    (x, y), (xt, yt) = digits
    names = leaf_names(per_channel=False, sparsity=[0.5, 0.75], clusters=[8, 16])
    assert len(names) == 18 and names[:2] == ["PTQ", "QAT"]
    assert "PCQAT 75% k8" in names and "prune → PTQ 50%" in names
    with pytest.raises(ValueError, match="distinct"):
        leaf_names(sparsity=[0.5, 0.5])
    with pytest.raises(ValueError, match="clusters must be an int >= 3"):
        leaf_names(clusters=[8, 2])
    tree = co.DeploymentTree(
        trained, (x[:600], y[:600]), (xt, yt),
        compile={"optimizer": keras.optimizers.Adam(3e-4),
                 "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        fit=_fit_kw(), sparsity=[0.5, 0.75], clusters=[8, 16], latency_runs=3,
        vela_accelerator=None)
    messages = []
    paths = ["prune → PTQ 50%", "prune → PTQ 75%", "prune → cluster → PTQ 50% k8",
             "prune → cluster → PTQ 50% k16"]
    result = tree.explore(tmp_path / "run", paths=paths, log=messages.append)
    by = {r["path"]: r for r in result.rows}
    assert sorted(by) == sorted(paths)
    trained_nodes = [m for m in messages if "fine-tuning" in m]
    assert sum("prune@0.5:" in m for m in trained_nodes) == 1  # one parent for three leaves
    assert len(trained_nodes) == 4  # prune@0.5, prune@0.75, and the two cluster nodes
    assert by["prune → PTQ 75%"]["sparsity"] >= 0.7 > by["prune → PTQ 50%"]["sparsity"]
    for k in (8, 16):
        r = by[f"prune → cluster → PTQ 50% k{k}"]
        assert r["target_sparsity"] == 0.5 and r["target_clusters"] == k
        assert r["sparsity"] >= 0.45 and r["unique_max"] <= k and r["verified"] == "yes"
    assert (tmp_path / "run" / "tree.png").stat().st_size > 10_000


def test_stop_when_met_tries_the_mildest_settings_first(tmp_path, trained, digits):
    (x, y), (xt, yt) = digits
    tree = co.DeploymentTree(
        trained, (x[:600], y[:600]), (xt, yt),
        compile={"optimizer": keras.optimizers.Adam(3e-4),
                 "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        fit=_fit_kw(), sparsity=[0.5, 0.8], clusters=[8, 16], latency_runs=3,
        vela_accelerator=None, targets=co.Targets(max_metric_drop=0.05))
    messages = []
    result = tree.explore(tmp_path / "run", stop_when_met=True, log=messages.append)
    # level 1 at the mildest settings: no compression, 50 %, 16 clusters; PTQ meets 5 points
    assert [r["path"] for r in result.rows] == ["PTQ", "QAT", "prune → PTQ 50%",
                                                "cluster → PTQ k16"]
    assert any("level 1 meets the targets" in m for m in messages)
    assert result.recommended in {r["path"] for r in result.rows if r["meets_targets"]}
    assert len(result.plan) == 18  # the picture shows the rest as not built


def test_layer_policy_auto_spares_the_critical_layers(tmp_path, trained, digits):
    """The first conv (144 weights) alone costs ~12 points at 50 % sparsity, five times the
    median layer: "auto" leaves it dense, and unclustered at 4 values, in the files."""
    (x, y), (xt, yt) = digits
    kw = dict(compile={"optimizer": keras.optimizers.Adam(3e-4),
                       "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
              fit=_fit_kw(), sparsity=0.5, clusters=4, latency_runs=3, vela_accelerator=None)
    with pytest.raises(ValueError, match="max_metric_drop"):
        co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), layer_policy="auto", **kw)
    with pytest.raises(ValueError, match="layer_policy must be"):
        co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), layer_policy="some", **kw)
    tree = co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), layer_policy="auto",
                             targets=co.Targets(max_metric_drop=0.01), **kw)
    result = tree.explore(tmp_path / "run", paths=["prune → PTQ", "cluster → PTQ"], log=print)
    assert tree.spared["prune 50%"] == ["conv1"] and "conv1" in tree.spared["cluster 4"]
    cached = json.loads((tmp_path / "run" / "sensitivity.json").read_text())
    for setting, spared in tree.spared.items():  # the rule, recomputed from the measurements
        drops = {r["layer"]: r[setting] for r in cached["table"]}
        bar = max(0.01, 2 * float(np.median(list(drops.values()))))
        assert spared == sorted(n for n, d in drops.items() if d > bar)
    by = {r["path"]: r for r in result.rows}
    pruned = {t.layer: t.sparsity for t in co.inspect(by["prune → PTQ"]["file"]).tensors}
    assert pruned["conv1"] < 0.05 and pruned["conv2"] >= 0.45, pruned
    clustered = {t.layer: t.unique for t in co.inspect(by["cluster → PTQ"]["file"]).tensors}
    assert clustered["conv1"] > 4 and clustered["conv2"] <= 4, clustered
    md = (tmp_path / "run" / "report.md").read_text()
    assert 'Layers spared (layer_policy="auto")' in md and "prune 50%: conv1 spared" in md
    assert "sensitivity.png" in md
    # a resumed run reads the measurements back instead of measuring again
    messages = []
    co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), layer_policy="auto",
                      targets=co.Targets(max_metric_drop=0.01), **kw).explore(
        tmp_path / "run", paths=["prune → PTQ"], log=messages.append)
    assert not any("per-layer sensitivity at" in m for m in messages)
    assert any("prune 50%: conv1 spared" in m for m in messages)


def test_multi_output_model(tmp_path, digits):
    """A class head and a value head; the file lists its outputs in another order than
    Keras (tensor order), and the metric must still see them in the model's order."""
    (x, y), (xt, yt) = digits
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(keras.layers.MaxPooling2D()(h))
    cls = keras.layers.Dense(10, name="zclass")(h)
    value = keras.layers.Dense(1, name="avalue")(h)
    model = keras.Model(inp, [cls, value])
    loss = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"]
    model.compile(keras.optimizers.Adam(3e-3), loss)
    ys, yts = (y, y.astype("float32")), (yt, yt.astype("float32"))
    model.fit(x, ys, epochs=15, batch_size=32, verbose=0)

    def class_accuracy(y_true, y_pred):  # of the first output, whatever the file's order
        return float(np.mean(y_pred[0].argmax(1) == y_true[0]))

    tree = co.DeploymentTree(model, (x[:600], tuple(v[:600] for v in ys)), (xt, yts),
                             compile={"optimizer": keras.optimizers.Adam(3e-4), "loss": loss},
                             fit=_fit_kw(), metric=class_accuracy, latency_runs=3,
                             vela_accelerator=None)
    row = tree.explore(tmp_path / "run", paths=["PTQ"], log=print).rows[0]
    file_out = predict_tflite(row["file"], xt)
    assert [o.shape[1] for o in file_out] == [10, 1]  # the model's order
    assert row["int8_metric"] == pytest.approx(class_accuracy(yts, file_out))
    assert row["int8_metric"] > 0.8 and 0.9 <= row["agreement"] <= 1.0
    assert row["output_error"] < 0.1
    # the default top-1 averages over outputs given one label array per output
    from collabopt.metrics import resolve

    two_heads = [file_out[0], file_out[0]]
    assert resolve().score([yt, yt], two_heads) == pytest.approx(np.mean(
        file_out[0].argmax(1) == yt))
    with pytest.raises(ValueError, match="one label array per output"):
        resolve().score(yt, two_heads)
    with pytest.raises(ValueError, match="2 outputs: top-1 of which"):
        co.evaluate_tflite(row["file"], xt, yt)
