"""Run under tf.distribute.MirroredStrategy on two logical CPUs and compare with one device.
Prints a JSON line; used by tests/test_distributed.py (devices must be set before TF starts)."""

import json
import sys

import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import collabopt as co  # noqa: E402

sys.path.insert(0, sys.argv[1])
from tests.conftest import compile_model, tiny_conv_model  # noqa: E402


def pipeline(base):
    pruned = co.strip(co.prune(base, 0.5, verbose=False))
    clustered = co.strip(co.cluster(pruned, 4, verbose=False))
    return {
        "prune": co.prune(base, co.PolynomialDecay(0.1, 0.6, 0, 6, frequency=2), verbose=False),
        "cluster": co.cluster(pruned, 4, verbose=False),
        "pcqat": co.quantize(clustered, verbose=False),
    }


rng = np.random.default_rng(0)
x = rng.random((64, 8, 8, 1), dtype=np.float32)
y = rng.integers(0, 10, 64)
keras.utils.set_random_seed(0)
base = tiny_conv_model()
out = {}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
for name in ("prune", "cluster", "pcqat"):
    results = {}
    for where in ("single", "mirrored"):
        keras.utils.set_random_seed(1)
        if where == "mirrored":
            with strategy.scope():
                model = compile_model(pipeline(base)[name])
        else:
            model = compile_model(pipeline(base)[name])
        model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
        plain = co.strip(model)
        k = plain.get_layer("pw").kernel.numpy()
        results[where] = {"zeros": (k == 0).tolist(), "unique": int(np.unique(k).size),
                          "step": int(model.get_layer("pw").step.numpy()),
                          "kernel": k.tolist()}
    out[name] = results
print(json.dumps(out))
