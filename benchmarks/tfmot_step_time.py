"""Training-step time of tfmot 0.8.1 wrappers relative to plain training, on the same
architectures built in tf_keras. Runs inside benchmarks/tfmot_env (created by
bench_step_time.py); prints one JSON object. Not meant to be run by hand."""

from __future__ import annotations

import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402
from _common import timed_fit  # noqa: E402

L = keras.layers


def mnist_cnn():
    inp = keras.Input((28, 28, 1))
    x = inp
    for filters in (16, 32):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = L.BatchNormalization(momentum=0.9)(x)
        x = L.ReLU()(x)
        x = L.MaxPooling2D(2)(x)
    return keras.Model(inp, L.Dense(10)(L.Flatten()(x)))


def ds_cnn_l():
    inp = keras.Input((49, 10, 1))
    x = L.Conv2D(276, (10, 4), strides=(2, 1), padding="same", use_bias=False)(inp)
    x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
    for _ in range(5):
        x = L.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
        x = L.Conv2D(276, 1, use_bias=False)(x)
        x = L.ReLU()(L.BatchNormalization(momentum=0.9)(x))
    return keras.Model(inp, L.Dense(12)(L.GlobalAveragePooling2D()(x)))


def variants(build):
    sparsity = tfmot.sparsity.keras
    clustering = tfmot.clustering.keras
    quant = tfmot.quantization.keras
    cluster_params = {"number_of_clusters": 16,
                      "cluster_centroids_init": clustering.CentroidInitialization.KMEANS_PLUS_PLUS}

    def plain():
        return build()

    def prune():
        return sparsity.prune_low_magnitude(build(), sparsity.ConstantSparsity(0.5, 0))

    def pruned_plain():
        return sparsity.strip_pruning(prune())

    def cluster():
        return clustering.cluster_weights(build(), **cluster_params)

    def qat():
        return quant.quantize_model(build())

    def pqat():
        m = quant.quantize_annotate_model(pruned_plain())
        return quant.quantize_apply(
            m, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())

    def cqat():
        m = quant.quantize_annotate_model(clustering.strip_clustering(cluster()))
        return quant.quantize_apply(
            m, tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme())

    def pcqat():
        m = clustering.cluster_weights(pruned_plain(), preserve_sparsity=True, **cluster_params)
        m = quant.quantize_annotate_model(clustering.strip_clustering(m))
        return quant.quantize_apply(m, tfmot.experimental.combine
                                    .Default8BitClusterPreserveQuantizeScheme(True))

    return {"plain": plain, "prune": prune, "cluster": cluster, "QAT": qat, "PQAT": pqat,
            "CQAT": cqat, "PCQAT": pcqat}


def step_times(model, x, y, steps, callbacks):
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return timed_fit(keras, model, x, y, len(x) // steps, callbacks)


def main():
    arch, rounds, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    build, shape, classes = {"mnist_cnn": (mnist_cnn, (28, 28, 1), 10),
                             "ds_cnn_l": (ds_cnn_l, (49, 10, 1), 12)}[arch]
    rng = np.random.default_rng(0)
    x = rng.random((64 * steps, *shape), dtype=np.float32)
    y = rng.integers(0, classes, 64 * steps)
    models = {}
    for name, make in variants(build).items():
        try:
            models[name] = make()
        except Exception as err:  # noqa: BLE001 - report what tfmot cannot do
            models[name] = err
    results = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            if isinstance(model, Exception):
                continue
            cb = [tfmot.sparsity.keras.UpdatePruningStep()] if name == "prune" else []
            results[name] += step_times(model, x, y, steps, cb)[2:]
    out = {name: (float(np.median(t)) * 1000 if t else f"unsupported: {models[name]!r}"[:200])
           for name, t in results.items()}
    print(json.dumps({"arch": arch, "tf": tf.__version__, "tfmot": tfmot.__version__,
                      "median_ms": out}))


if __name__ == "__main__":
    main()
