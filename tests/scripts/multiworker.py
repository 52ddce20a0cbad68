"""One worker of a two-process MultiWorkerMirroredStrategy run on loopback (TF_CONFIG set by
the caller): scheduled pruning and PCQAT in a custom training loop (Keras 3.15's fit does
not run under this strategy). Prints a JSON line with the worker's final state."""

import json
import sys

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf

import collabopt as co  # noqa: E402

sys.path.insert(0, sys.argv[1])
from tests.conftest import tiny_conv_model  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
rng = np.random.default_rng(0)
x = rng.random((64, 8, 8, 1), dtype=np.float32)
y = rng.integers(0, 10, 64)
keras.utils.set_random_seed(0)
base = tiny_conv_model()
pruned = co.strip(co.prune(base, 0.5, verbose=False))
clustered = co.strip(co.cluster(pruned, 4, verbose=False))
with strategy.scope():
    pcqat = co.quantize(clustered, verbose=False)
    scheduled = co.prune(base, co.PolynomialDecay(0.1, 0.6, 0, 6, frequency=2), verbose=False)
    optimizers = {id(pcqat): keras.optimizers.SGD(0.05), id(scheduled): keras.optimizers.SGD(0.05)}
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
data = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((x, y)).batch(16))


def train(model):
    opt = optimizers[id(model)]

    @tf.function
    def step(xb, yb):
        def replica(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(loss_fn(yb, model(xb, training=True)),
                                                  global_batch_size=16)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))

        strategy.run(replica, args=(xb, yb))

    for _ in range(2):
        for xb, yb in data:
            step(xb, yb)


train(pcqat)
train(scheduled)
k = co.strip(pcqat).get_layer("pw").kernel.numpy()
print(json.dumps({
    "kernel": k.tolist(), "unique": int(np.unique(k).size),
    "zeros_kept": bool(np.all(k[pruned.get_layer("pw").kernel.numpy() == 0] == 0)),
    "mask": scheduled.get_layer("pw").transforms[0].mask.numpy().tolist(),
    "sparsity": float(np.mean(co.strip(scheduled).get_layer("pw").kernel.numpy() == 0)),
    "step": int(scheduled.get_layer("pw").step.numpy())}))
