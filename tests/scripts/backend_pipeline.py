"""prune -> cluster (per tensor and per channel, zeros kept) -> PCQAT trained on the backend
given by KERAS_BACKEND, on the 8x8 digits; saves the models as .keras and prints a JSON line
with the invariants. Used by tests/test_backends.py."""

import json
import sys
from pathlib import Path

import keras
import numpy as np

import collabopt as co
from collabopt import datasets, models

out = Path(sys.argv[1])
(x, y), (xt, yt) = datasets.digits()
keras.utils.set_random_seed(0)


def compiled(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def accuracy(model):
    return float(np.mean(np.argmax(np.asarray(model.predict(xt, verbose=0)), 1) == yt))


base = compiled(models.mnist_cnn((8, 8, 1)))
base.fit(x, y, epochs=6, batch_size=32, verbose=0)
result = {"backend": keras.backend.backend(), "base": accuracy(base)}
folded = co.fold_batchnorm(base)
pruned = compiled(co.prune(folded, co.PolynomialDecay(0.2, 0.5, 0, 40, frequency=10),
                           verbose=False))
pruned.fit(x, y, epochs=2, batch_size=32, verbose=0)
pruned = co.strip(pruned)
zeros = {name: pruned.get_layer(name).kernel.numpy() == 0 for name in ("conv1", "conv2",
                                                                       "logits")}
result["prune_sparsity"] = float(np.mean(zeros["conv2"]))
for per_channel in (False, True):
    tag = "pc" if per_channel else "pt"
    for init in ("kmeans++", "kmeans1d", "linear", "density", "random"):
        c = compiled(co.cluster(pruned, 8, init=init, per_channel=per_channel, verbose=False))
        c.fit(x[:256], y[:256], epochs=1, batch_size=32, verbose=0)
    clustered = compiled(co.cluster(pruned, 8, per_channel=per_channel, verbose=False))
    clustered.fit(x, y, epochs=2, batch_size=32, verbose=0)
    clustered = co.strip(clustered)
    qat = compiled(co.quantize(clustered, verbose=False), lr=3e-4)
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    qat.save(out / f"pcqat_{tag}.keras")
    plain = co.strip(qat)
    for name, z in zeros.items():
        k = plain.get_layer(name).kernel.numpy()
        result[f"{tag}_{name}_zeros_kept"] = bool(np.all(k[z] == 0))
        if per_channel:
            from collabopt.core.structure import detect

            result[f"{tag}_{name}_unique"] = detect(k, (-1,)).unique_per_channel_max
        else:
            result[f"{tag}_{name}_unique"] = int(np.unique(k).size)
    result[f"{tag}_accuracy"] = accuracy(qat)
print(json.dumps(result))
