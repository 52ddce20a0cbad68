"""keras.distribution.DataParallel on two host devices (JAX) vs one device: prune, cluster and
PCQAT keep their invariants and match. Prints a JSON line."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["KERAS_BACKEND"] = "jax"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import collabopt as co  # noqa: E402

sys.path.insert(0, sys.argv[1])
from tests.conftest import compile_model, tiny_conv_model  # noqa: E402

rng = np.random.default_rng(0)
x = rng.random((64, 8, 8, 1), dtype=np.float32)
y = rng.integers(0, 10, 64)
out = {"devices": len(jax.devices())}
for where in ("single", "data_parallel"):
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()) if where != "single" else None)
    keras.utils.set_random_seed(0)
    base = tiny_conv_model()
    pruned = compile_model(co.prune(base, co.PolynomialDecay(0.1, 0.6, 0, 6, frequency=2),
                                    verbose=False))
    pruned.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    pruned = co.strip(pruned)
    clustered = compile_model(co.cluster(pruned, 4, verbose=False))
    clustered.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    qat = compile_model(co.quantize(co.strip(clustered), verbose=False))
    qat.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0)
    k = co.strip(qat).get_layer("pw").kernel.numpy()
    out[where] = {"zeros": (pruned.get_layer("pw").kernel.numpy() == 0).tolist(),
                  "zeros_after": (k == 0).tolist(), "unique": int(np.unique(k).size),
                  "kernel": k.tolist()}
print(json.dumps(out))
