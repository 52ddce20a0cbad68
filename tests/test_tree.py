import json

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.tree import ConfigMismatch, _calibration_inputs, leaf_names


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _node(tree, name):
    return next(n for n in tree.nodes if n.name == name)


def _tree(trained, digits, **kw):
    (x, y), (xt, yt) = digits
    options = dict(compile={"optimizer": keras.optimizers.Adam(3e-4), "loss": _loss()},
                   fit={"epochs": 1, "batch_size": 64, "verbose": 0}, clusters=8,
                   targets=co.Targets(max_accuracy_drop=0.05), latency_runs=5)
    options.update(kw)
    return co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), **options)


@pytest.mark.slow
def test_explore_all_leaves(tmp_path, trained, digits):
    result = _tree(trained, digits, per_channel=True).explore(tmp_path / "run", log=print)
    rows = result.table()
    assert sorted(r["path"] for r in rows) == sorted(leaf_names(per_channel=True))
    levels = [r["level"] for r in rows]
    assert levels == sorted(levels) and len(rows) == 12
    for r in rows:
        assert r["verified"] == "yes", r
        assert r["int8_accuracy"] > 0.8 and r["zip_bytes"] < result.baseline["zip_bytes"]
        assert co.inspect(r["file"]).fully_integer
        # fidelity: agreement bounds the accuracy difference (|Δacc| <= 1 - agreement)
        assert 0.9 <= r["agreement"] <= 1.0
        assert abs(r["int8_accuracy"] - r["keras_accuracy"]) <= 1 - r["agreement"] + 1e-9
    by = {r["path"]: r for r in rows}
    assert by["PCQAT"]["sparsity"] >= 0.45 and by["PCQAT"]["unique_max"] <= 8
    assert by["CQAT(pc)"]["unique_per_channel_max"] <= 8
    for leaf in ("cluster(pc) → PTQ", "CQAT(pc)", "PCQAT(pc)"):  # Dense: one scale, one codebook
        dense = [t for t in co.inspect(by[leaf]["file"]).tensors if t.op == "FULLY_CONNECTED"]
        assert len(dense) == 1 and dense[0].unique <= 8, leaf
    assert by["prune → PTQ"]["sparsity"] >= 0.45
    assert result.recommended in by
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| PCQAT |" in md and "pareto.png" in md and "density.png" in md
    html = (tmp_path / "run" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2
    assert not list((tmp_path / "run").rglob("*.partial*"))


def test_resume_after_interrupt(tmp_path, trained, digits):
    tree = _tree(trained, digits)
    messages = []

    def crash_after_two_leaves(msg):
        messages.append(msg)
        if sum("level" in m and "int8 accuracy" in m for m in messages) == 2:
            raise KeyboardInterrupt

    paths = ["PTQ", "prune → PTQ", "PQAT"]
    with pytest.raises(KeyboardInterrupt):
        tree.explore(tmp_path / "run", paths=paths, log=crash_after_two_leaves)
    assert (tmp_path / "run" / "nodes" / "prune.keras").exists()
    second = []
    result = tree.explore(tmp_path / "run", paths=paths, log=second.append)
    assert [r["path"] for r in result.rows] == paths
    assert any("PTQ: done earlier" in m for m in second)
    assert not any("prune: prune of base" in m for m in second)  # parent not retrained
    assert any("prune: loaded" in m for m in second)
    assert not list((tmp_path / "run").rglob("*.partial*"))


def test_config_mismatch_and_force(tmp_path, trained, digits):
    _tree(trained, digits).explore(tmp_path / "run", paths=["PTQ"], log=lambda m: None)
    other = _tree(trained, digits, sparsity=0.7)
    with pytest.raises(ConfigMismatch, match="sparsity"):
        other.explore(tmp_path / "run", paths=["PTQ"], log=lambda m: None)
    result = other.explore(tmp_path / "run", paths=["PTQ"], force=True, log=lambda m: None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sparsity"] == 0.7
    assert len(result.rows) == 1


def test_stop_when_met(tmp_path, trained, digits):
    tree = _tree(trained, digits, targets=co.Targets(max_accuracy_drop=0.5))
    result = tree.explore(tmp_path / "run", paths=["PTQ", "PQAT"], stop_when_met=True,
                          log=lambda m: None)
    assert [r["path"] for r in result.rows] == ["PTQ"]
    assert result.recommended == "PTQ"


def test_dataset_inputs_and_bad_arguments(tmp_path, trained, digits):
    import tensorflow as tf

    (x, y), (xt, yt) = digits
    train = tf.data.Dataset.from_tensor_slices((x[:256], y[:256])).batch(32)
    val = tf.data.Dataset.from_tensor_slices((xt, yt)).batch(64)
    tree = co.DeploymentTree(trained, train, val, compile={"optimizer": "adam",
                                                           "loss": _loss()},
                             fit={"epochs": 1, "verbose": 0}, latency_runs=3)
    result = tree.explore(tmp_path / "ds", paths=["PTQ"], log=lambda m: None)
    assert result.rows[0]["int8_accuracy"] > 0.8
    with pytest.raises(ValueError, match="unknown tree path"):
        tree.explore(tmp_path / "ds", paths=["nope"])
    with pytest.raises(ValueError, match="sparsity"):
        co.DeploymentTree(trained, (x, y), (xt, yt), sparsity=1.5)
    with pytest.raises(ValueError, match="clusters"):
        co.DeploymentTree(trained, (x, y), (xt, yt), clusters=2)
    assert np.isfinite(result.baseline["latency_ms"])


def test_gradual_prune_schedule_and_code_version(trained, digits):
    """Pruning ramps over 2/3 of the fine-tune; the fingerprint names the code that trained."""
    from collabopt.pruning import PolynomialDecay

    tree = _tree(trained, digits, sparsity=0.75, fit={"epochs": 3, "batch_size": 64})
    schedule = tree._prune_schedule(0.75)
    steps = 3 * -(-600 // 64)  # 600 samples, batch 64
    assert isinstance(schedule, PolynomialDecay) and schedule.final == 0.75
    assert schedule.end_step == (2 * steps) // 3 and 1 <= schedule.frequency <= schedule.end_step
    version = tree.fingerprint()["collabopt"]
    assert version.startswith(co.__version__ + "+") and len(version.split("+")[1]) == 12


def test_qat_compile_used_for_qat_nodes_only(trained, digits):
    """QAT nodes get their own (gentler) compile; the fingerprint tells the settings apart."""
    seen = []

    def compile_with(lr):
        def fn(model):
            from collabopt.quantization import WeightFakeQuant

            qat = any(isinstance(t, WeightFakeQuant)
                      for layer in model.layers for t in getattr(layer, "transforms", []))
            seen.append(("QAT" if qat else "float", lr))
            model.compile(keras.optimizers.Adam(lr), _loss())
        return fn

    tree = _tree(trained, digits, compile=compile_with(3e-4), qat_compile=compile_with(1e-5))
    parent = tree.model
    tree._train(_node(tree, "qat"), parent, print)
    tree._train(_node(tree, "cluster"), parent, print)
    assert seen == [("QAT", 1e-5), ("float", 3e-4)]
    other = _tree(trained, digits, compile=compile_with(3e-4), qat_compile=compile_with(1e-4))
    assert tree.fingerprint()["qat_compile"] != other.fingerprint()["qat_compile"]
    assert tree.fingerprint() == _tree(trained, digits, compile=compile_with(3e-4),
                                       qat_compile=compile_with(1e-5)).fingerprint()


def test_a_diverged_fine_tune_fails_its_node_with_what_to_do(trained, digits):
    def explode(model):
        model.compile(keras.optimizers.SGD(1e30), _loss())

    tree = _tree(trained, digits, compile=explode)
    with pytest.raises(FloatingPointError, match="diverged.*Lower the learning rate"):
        tree._train(_node(tree, "prune"), tree.model, print)


def test_prune_layers_selects_what_the_prune_node_prunes(trained, digits):
    tree = _tree(trained, digits, prune_layers=["conv2"])
    pruned = co.strip(tree._train(_node(tree, "prune"), tree.model, print))
    sparsity = {layer.name: float(np.mean(layer.get_weights()[0] == 0))
                for layer in pruned.layers if layer.name in ("conv1", "conv2")}
    assert sparsity["conv2"] >= 0.45 and sparsity["conv1"] < 0.05
    assert tree.fingerprint()["prune_layers"] != _tree(trained, digits).fingerprint()[
        "prune_layers"]


@pytest.mark.slow
def test_cluster_layers_selects_what_the_cluster_nodes_cluster(trained, digits):
    tree = _tree(trained, digits, cluster_layers=["conv2"], per_channel=True)
    for op in ("cluster", "cluster_pc"):
        clustered = co.strip(tree._train(_node(tree, op), tree.model, print))
        unique = {layer.name: len(np.unique(layer.get_weights()[0]))
                  for layer in clustered.layers if layer.name in ("conv1", "conv2")}
        assert unique["conv1"] > 8 * 16, (op, unique)
        assert unique["conv2"] <= (8 if op == "cluster" else 8 * 32), (op, unique)
    assert tree.fingerprint()["cluster_layers"] == '["conv2"]'
    assert _tree(trained, digits).fingerprint()["cluster_layers"] == "all"


def test_a_pruned_layer_left_unclustered_keeps_its_zeros_to_the_file(tmp_path, trained, digits,
                                                                      monkeypatch):
    """PCQAT with conv1 pruned but not clustered: its zeros reach the file, and the tree's
    lineage check fails a leaf whose fine-tunes refilled them (as they did before keep_zeros)."""
    tree = _tree(trained, digits, cluster_layers=["conv2"], vela_accelerator=None,
                 latency_runs=1)
    row = tree.explore(tmp_path / "kept", paths=["PCQAT"]).rows[0]
    assert row["verified"] == "yes"
    pruned = keras.models.load_model(tmp_path / "kept" / "nodes" / "prune.keras")
    zeros = pruned.get_layer("conv1").kernel.numpy() == 0
    conv1 = next(t for t in co.inspect(row["file"]).tensors if t.layer == "conv1")
    # the file holds the kernel as (out, h, w, in): the prune node's zeros, each one of them
    assert np.all(conv1.values[np.transpose(zeros, (3, 0, 1, 2))] == conv1.zero)

    monkeypatch.setattr(co.pruning, "keep_zeros", lambda model, **kw: model)
    row = tree.explore(tmp_path / "refilled", paths=["PCQAT"]).rows[0]
    assert row["verified"].startswith("no: conv1.kernel: ") and "refilled" in row["verified"]
    assert not row["meets_targets"]


def test_steps_per_epoch_of_every_data_kind():
    import tensorflow as tf

    from collabopt.tree import _steps_per_epoch

    x, y = np.zeros((100, 4), "float32"), np.zeros(100, "int64")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    assert _steps_per_epoch((x, y), 32) == 4 and _steps_per_epoch(ds, 0) == 4
    unknown = ds.filter(lambda a, b: True)  # cardinality unknown: counted by iterating
    assert _steps_per_epoch(unknown, 0) == 4


def test_batchnorm_keep_trains_bn_where_the_file_keeps_the_structure(tmp_path, trained, digits):
    """batchnorm="keep": per-channel cluster and QAT nodes keep BN training, the per-tensor
    cluster node still folds it; the per-channel leaves keep zeros and per-channel codebooks
    in the file."""
    from collabopt.quantization import FoldedBatchNorm

    tree = _tree(trained, digits, per_channel=True, batchnorm="keep")
    assert tree.fingerprint()["batchnorm"] == "keep"

    def bn_kinds(model):
        return {type(layer).__name__ for layer in co.strip(model).layers
                if isinstance(layer, (keras.layers.BatchNormalization, FoldedBatchNorm))}
    assert bn_kinds(tree._train(_node(tree, "cluster"), trained, print)) == {
        "FoldedBatchNorm"}
    assert bn_kinds(tree._train(_node(tree, "cluster_pc"), trained, print)) == {
        "BatchNormalization"}
    rows = {r["path"]: r for r in tree.explore(
        tmp_path / "run", paths=["PQAT", "PCQAT(pc)"]).table()}
    for path in ("PQAT", "PCQAT(pc)"):
        r = rows[path]
        assert r["verified"] == "yes" and r["sparsity"] >= 0.45, r
        assert abs(r["int8_accuracy"] - r["keras_accuracy"]) <= 1 - r["agreement"] + 1e-9
    assert rows["PCQAT(pc)"]["unique_per_channel_max"] <= 8
    with pytest.raises(ValueError, match="batchnorm must be one of"):
        _tree(trained, digits, batchnorm="yes")


def _node_weights(run, node):
    return keras.models.load_model(run / "nodes" / f"{node}.keras").get_weights()


@pytest.mark.slow
def test_seed_makes_a_leaf_independent_of_the_paths_explored_before_it(tmp_path, digits):
    """Each node's fine-tune is reseeded: training QAT first no longer shifts PQAT.

    The stream matters where a rewritten layer draws a fresh seed (Dropout, as in MobileNet).
    """
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Dropout(0.3)(keras.layers.Flatten()(h))
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    model.compile("adam", _loss())
    model.fit(x, y, epochs=2, verbose=0)
    runs = {}
    for seed in (0, None):
        for name, paths in (("alone", ["PQAT"]), ("after_qat", ["QAT", "PQAT"])):
            keras.utils.set_random_seed(1)  # the caller's stream, as a script would set it
            run = tmp_path / f"{seed}_{name}"
            _tree(model, digits, seed=seed).explore(run, paths=paths, log=lambda m: None)
            runs[seed, name] = _node_weights(run, "pqat")
    for a, b in zip(runs[0, "alone"], runs[0, "after_qat"], strict=True):
        np.testing.assert_array_equal(a, b)
    # without reseeding, the QAT node's rewrite consumed the stream the PQAT node then used
    assert any(not np.array_equal(a, b)
               for a, b in zip(runs[None, "alone"], runs[None, "after_qat"], strict=True))


def test_seed_is_validated(trained, digits):
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            _tree(trained, digits, seed=bad)


def test_calibration_spans_class_sorted_arrays(digits):
    (x, y), _ = digits
    order = np.argsort(y, kind="stable")  # sorted by class: the first 300 hold 3 classes
    xs, ys = x[order], y[order]
    assert len(set(ys[:300])) <= 3
    picked = _calibration_inputs((xs, ys), 300)
    assert len(picked) == 300
    rows = {xs[i].tobytes(): ys[i] for i in range(len(xs))}
    assert {rows[p.tobytes()] for p in picked} == set(range(10))
    assert len(_calibration_inputs((xs[:50], ys[:50]), 300)) == 50  # fewer than asked: all


def test_cluster_node_gets_its_channel_means_back(tmp_path, trained, digits):
    """With batch norm folded, the cluster node's fine-tune leaves each channel's mean output
    where clustering moved it; bias correction puts it back (and only then)."""
    from collabopt.bias_correction import _channel_means
    from collabopt.quantization import fold_batchnorm

    (x, _), _ = digits
    folded = fold_batchnorm(trained)
    cal = _calibration_inputs((x[:600], None), 300)
    gaps = {}
    for on in (True, False):
        run = tmp_path / str(on)
        tree = _tree(trained, digits, clusters=3, bias_correction=on)
        tree.explore(run, paths=["cluster → PTQ"], log=lambda m: None)
        assert tree.fingerprint()["bias_correction"] is on
        node = keras.models.load_model(run / "nodes" / "cluster.keras")
        gaps[on] = max(np.abs(_channel_means(node, n, cal, 256)
                              - _channel_means(folded, n, cal, 256)).max()
                       for n in ("conv1", "conv2", "logits"))
    assert gaps[True] < 1e-3 < gaps[False], gaps


def test_every_leaf_of_a_subclassed_model_keeps_its_structure_in_the_file(tmp_path):
    """No graph: QAT leaves are calibrated at export, which must keep a per-tensor codebook
    on one scale (the tree once forced per-channel scales: PCQAT's 16 values became 32)."""
    from collabopt.zoo import ZOO

    keras.utils.set_random_seed(0)
    model, x, y = ZOO["subclassed"](n=96)
    tree = co.DeploymentTree(model, (x[:64], y[:64]), (x[64:], y[64:]),
                             compile={"optimizer": "adam", "loss": _loss()},
                             fit={"epochs": 1, "batch_size": 16, "verbose": 0},
                             calibration_samples=64, latency_runs=1, vela_accelerator=None)
    rows = tree.explore(tmp_path / "run", log=lambda line: None).rows
    assert len(rows) == len(leaf_names(per_channel=False))
    for r in rows:
        assert r["verified"] == "yes", r
    pcqat = next(r for r in rows if r["path"] == "PCQAT")
    assert pcqat["unique_max"] <= 16 and pcqat["sparsity"] >= 0.45


def test_a_short_fine_tune_re_estimates_stale_batch_norm(tmp_path, trained, digits):
    """keras.applications train batch norm with momentum 0.999: after a short fine-tune the
    moving averages are still mostly the parent's (MobileNetV3Small fell to chance), so the
    tree sets them from the fine-tuned model's own batch statistics."""
    model = keras.models.clone_model(trained)
    model.set_weights(trained.get_weights())
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.999
    parent_mean = bns[0].moving_mean.numpy().copy()
    messages = []
    tree = _tree(model, digits, sparsity=[0.75])
    tree.explore(tmp_path / "run", paths=["prune → PTQ"], log=messages.append)
    assert any("prune: batch norm statistics re-estimated" in m for m in messages), messages
    node = keras.models.load_model(tmp_path / "run" / "nodes" / "prune.keras")
    x = digits[0][0][:600]  # the tree's training samples
    conv = keras.Model(node.inputs, node.get_layer("conv1").output)
    batch_means = [np.asarray(conv(x[i:i + 64])).mean(axis=(0, 1, 2))
                   for i in range(0, len(x), 64)]
    settled = node.get_layer("conv1_bn").moving_mean.numpy()
    np.testing.assert_allclose(settled, np.mean(batch_means, axis=0), atol=1e-4)
    assert np.abs(settled - parent_mean).max() > 10 * np.abs(settled - np.mean(
        batch_means, axis=0)).max()


def test_settle_batchnorm_restores_every_other_state(trained, digits):
    """The training-mode pass that settles batch norm must not move pruning masks, step
    counters or QAT activation ranges."""
    x = digits[0][0][:256]
    model = co.quantize(co.prune(trained, 0.5, verbose=False), verbose=False,
                        batchnorm="keep")
    model(x[:32], training=True)  # ranges and masks set once, as after a fit
    bn_vars = {id(v) for layer in model._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization)
               for v in (layer.moving_mean, layer.moving_variance)}
    others = {v.path: v.numpy().copy() for v in model.non_trainable_variables
              if id(v) not in bn_vars}
    before = [v.numpy().copy() for v in model.non_trainable_variables if id(v) in bn_vars]
    co.batchnorm.settle_batchnorm(model, [x[:128], x[128:]])
    for v in model.non_trainable_variables:
        if id(v) not in bn_vars:
            np.testing.assert_array_equal(v.numpy(), others[v.path], err_msg=v.path)
    after = [v.numpy() for v in model.non_trainable_variables if id(v) in bn_vars]
    assert any(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
