"""The deployment-tree leaves built with tfmot 0.8.1 (tf_keras), for side-by-side comparison.
Runs inside benchmarks/tfmot_env; reads the data and the trained base weights that
bench_vs_tfmot.py wrote, fine-tunes every node with the same optimizer, epochs and batch size,
and exports each leaf with the same converter settings. Evaluation happens in the main
environment, identically for both systems. Not meant to be run by hand.

    tfmot_env/bin/python tfmot_tree.py WORKDIR ARCH EPOCHS SPARSITY CLUSTERS LR QAT_LR
        [--seed N] [--leaves "PTQ,prune → PTQ"] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

L = keras.layers
sparsity_api = tfmot.sparsity.keras
cluster_api = tfmot.clustering.keras
quant_api = tfmot.quantization.keras
combine = tfmot.experimental.combine


def mnist_cnn(shape, classes):
    inp = keras.Input(shape)
    x = inp
    for i, filters in enumerate((16, 32), start=1):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = L.BatchNormalization(momentum=0.9, name=f"conv{i}_bn")(x)
        x = L.ReLU(name=f"conv{i}_relu")(x)
        x = L.MaxPooling2D(2, name=f"pool{i}")(x)
    return keras.Model(inp, L.Dense(classes, name="logits")(L.Flatten(name="flatten")(x)))


def ds_cnn_l(shape, classes):
    inp = keras.Input(shape)
    x = L.Conv2D(276, (10, 4), strides=(2, 1), padding="same", use_bias=False,
                 name="conv_1")(inp)
    x = L.ReLU()(L.BatchNormalization(momentum=0.9, name="conv_1_bn")(x))
    for i in range(1, 6):
        x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw_{i}")(x)
        x = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"dw_{i}_bn")(x))
        x = L.Conv2D(276, 1, use_bias=False, name=f"pw_{i}")(x)
        x = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"pw_{i}_bn")(x))
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, L.Dense(classes, name="logits")(x))


def mobilenet_v1(shape, classes, alpha=0.25):
    """collabopt.models.mobilenet_v1 layer for layer (same weight order)."""
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]
    inp = keras.Input(shape)
    x = L.Conv2D(int(32 * alpha), 3, strides=2, padding="same", use_bias=False,
                 name="conv1")(inp)
    x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9, name="conv1_bn")(x))
    for i, (filters, stride) in enumerate(plan, start=1):
        x = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                              name=f"conv_dw_{i}")(x)
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9, name=f"conv_dw_{i}_bn")(x))
        x = L.Conv2D(int(filters * alpha), 1, use_bias=False, name=f"conv_pw_{i}")(x)
        x = L.ReLU(6.0)(L.BatchNormalization(momentum=0.9, name=f"conv_pw_{i}_bn")(x))
    x = L.Dropout(1e-3)(L.GlobalAveragePooling2D(name="pool")(x))
    return keras.Model(inp, L.Dense(classes, name="logits")(x))


def resnet8(shape, classes):
    """collabopt.models.resnet8 layer for layer (same names: weights load by name)."""
    reg = keras.regularizers.L2(1e-4)
    inp = keras.Input(shape)
    x = L.Conv2D(16, 3, padding="same", kernel_regularizer=reg, name="conv0")(inp)
    x = L.ReLU()(L.BatchNormalization(momentum=0.9, name="conv0_bn")(x))
    for stack, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        y = L.Conv2D(filters, 3, strides=stride, padding="same", kernel_regularizer=reg,
                     name=f"s{stack}_conv1")(x)
        y = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"s{stack}_bn1")(y))
        y = L.Conv2D(filters, 3, padding="same", kernel_regularizer=reg,
                     name=f"s{stack}_conv2")(y)
        y = L.BatchNormalization(momentum=0.9, name=f"s{stack}_bn2")(y)
        if stride != 1:
            x = L.Conv2D(filters, 1, strides=stride, padding="same", kernel_regularizer=reg,
                         name=f"s{stack}_shortcut")(x)
        x = L.ReLU()(L.Add(name=f"s{stack}_add")([x, y]))
    x = L.Flatten(name="flatten")(L.AveragePooling2D(pool_size=x.shape[1:3], name="pool")(x))
    return keras.Model(inp, L.Dense(classes, name="logits")(x))


def slug(leaf: str) -> str:
    return leaf.replace(" → ", "-").replace("(pc)", "_pc").replace(" ", "_")


def export(model, path, qat, x):
    """int8 in and out, as collabopt exports; post-training leaves calibrate on 300 inputs
    spread through ``x``."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if not qat:
        def gen():
            for i in np.linspace(0, len(x) - 1, min(300, len(x))).astype(int):
                yield [x[i:i + 1]]
        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    Path(path).write_bytes(converter.convert())


def fresh(model):
    """A clone with the same weights: tfmot wrappers take over the layers they wrap."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def leaf_makers(base, fit, clusters, schedule, qat_lr) -> dict:
    """{leaf name: () -> (model to export, is QAT)} built the tfmot way. Parents are trained
    once, on first use, and shared by their children, as in collabopt's tree; a failure
    stays the failing leaf's. ``fit(model, rate=None)`` fine-tunes; ``base()`` builds the
    base model."""
    def cluster(model, per_channel=False, preserve=False):
        kwargs = {"number_of_clusters": clusters, "preserve_sparsity": preserve,
                  "cluster_centroids_init": cluster_api.CentroidInitialization.KMEANS_PLUS_PLUS}
        if per_channel:
            kwargs["cluster_per_channel"] = True
        return cluster_api.strip_clustering(fit(cluster_api.cluster_weights(model, **kwargs)))

    def qat(model, scheme=None):
        annotated = quant_api.quantize_annotate_model(model)
        q = quant_api.quantize_apply(annotated, scheme) if scheme else quant_api.quantize_apply(
            annotated)
        return fit(q, qat_lr)

    trained = {}

    def once(make):
        """A parent trained on first use (inside a leaf's try: a failure stays that leaf's)."""
        def get():
            if make not in trained:
                trained[make] = make()
            return trained[make]
        return get

    pruned = once(lambda: sparsity_api.strip_pruning(
        fit(sparsity_api.prune_low_magnitude(base(), schedule))))
    clustered = once(lambda: cluster(base()))
    clustered_pc = once(lambda: cluster(base(), per_channel=True))
    pruned_clustered = once(lambda: cluster(fresh(pruned()), preserve=True))
    pruned_clustered_pc = once(lambda: cluster(fresh(pruned()), per_channel=True, preserve=True))
    return {
        "PTQ": lambda: (base(), False),
        "QAT": lambda: (qat(base()), True),
        "prune → PTQ": lambda: (fresh(pruned()), False),
        "cluster → PTQ": lambda: (fresh(clustered()), False),
        "cluster(pc) → PTQ": lambda: (fresh(clustered_pc()), False),
        "PQAT": lambda: (qat(fresh(pruned()), combine.Default8BitPrunePreserveQuantizeScheme()),
                         True),
        "prune → cluster → PTQ": lambda: (fresh(pruned_clustered()), False),
        "CQAT": lambda: (qat(fresh(clustered()),
                             combine.Default8BitClusterPreserveQuantizeScheme(False)), True),
        "PCQAT": lambda: (qat(fresh(pruned_clustered()),
                              combine.Default8BitClusterPreserveQuantizeScheme(True)), True),
        "CQAT(pc)": lambda: (qat(fresh(clustered_pc()),
                                 combine.Default8BitClusterPreserveQuantizeScheme(False)), True),
        "prune → cluster(pc) → PTQ": lambda: (fresh(pruned_clustered_pc()), False),
        "PCQAT(pc)": lambda: (qat(fresh(pruned_clustered_pc()),
                                  combine.Default8BitClusterPreserveQuantizeScheme(True)), True),
    }


def main():
    parser = argparse.ArgumentParser()
    for name, kind in (("work", Path), ("arch", str), ("epochs", int), ("sparsity", float),
                       ("clusters", int), ("lr", float), ("qat_lr", float)):
        parser.add_argument(name, type=kind)
    parser.add_argument("--seed", type=int, default=0, help="reseeded before every fit")
    parser.add_argument("--leaves", help="comma-separated leaf names (default: all)")
    parser.add_argument("--out", default="tfmot", help="folder under WORKDIR for the files")
    args = parser.parse_args()
    work, arch, epochs, sparsity, clusters = (args.work, args.arch, args.epochs, args.sparsity,
                                              args.clusters)
    lr, qat_lr = args.lr, args.qat_lr
    data = np.load(work / "data.npz")
    x, y = data["x_train"], data["y_train"]
    shape, classes = x.shape[1:], int(data["classes"])
    # by layer name where the run saved names (layer order differs between Keras versions)
    named = "layer_names" in data
    base_weights = ({name: [data[f"{name}__{j}"] for j in range(int(data[f"{name}__n"]))]
                     for name in data["layer_names"]} if named else
                    [data[f"w{i}"] for i in range(int(data["n_weights"]))])
    out = work / args.out
    out.mkdir(exist_ok=True)

    def base():
        model = {"mnist_cnn": mnist_cnn, "ds_cnn_l": ds_cnn_l, "mobilenet_v1": mobilenet_v1,
                 "resnet8": resnet8}[arch](shape, classes)
        if named:
            for layer in model.layers:
                if layer.weights:
                    layer.set_weights(base_weights[layer.name])
        else:
            model.set_weights(base_weights)
        return model

    def fit(model, rate=None):
        keras.utils.set_random_seed(args.seed)
        model.compile(keras.optimizers.Adam(rate or lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callbacks = [sparsity_api.UpdatePruningStep()] if any(
            "prune_low_magnitude" in layer.name for layer in model.layers) else []
        model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=callbacks)
        return model

    results = {}
    # the schedule collabopt's tree uses: a Zhu & Gupta ramp over 2/3 of the fine-tune
    end = max(1, 2 * (-(-len(x) // 64) * epochs) // 3)
    schedule = sparsity_api.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end,
                                            frequency=max(1, end // 16))
    leaves = leaf_makers(base, fit, clusters, schedule, qat_lr)

    wanted = args.leaves.split(",") if args.leaves else list(leaves)
    if unknown := set(wanted) - set(leaves):
        raise SystemExit(f"unknown leaves {sorted(unknown)}; known: {list(leaves)}")
    for name, make in ((name, leaves[name]) for name in wanted):
        try:
            model, is_qat = make()
            export(model, out / f"{slug(name)}.tflite", is_qat, x)
            results[name] = "ok"
        except Exception as err:  # noqa: BLE001 - report what tfmot cannot do
            results[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
        print(name, results[name], flush=True)
    (out / "status.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
