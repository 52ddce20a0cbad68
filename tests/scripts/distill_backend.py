"""co.distill under the backend given by KERAS_BACKEND: a pruned student learns a trained
teacher's function from labels that say nothing (shuffled), under fit; the teacher's weights
stay as they were (AdamW with weight decay would shrink any weight it saw). Prints a JSON line.
Used by tests/test_distillation.py."""

import json

import keras
import numpy as np

import collabopt as co
from collabopt import datasets, models

(x, y), (xt, yt) = datasets.digits()
keras.utils.set_random_seed(0)
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
teacher = models.mnist_cnn((8, 8, 1))
teacher.compile(keras.optimizers.Adam(1e-3), loss)
teacher.fit(x, y, epochs=5, batch_size=32, verbose=0)
before = [w.copy() for w in teacher.get_weights()]
noise = np.random.default_rng(0).permutation(y)  # labels carrying no information


def agreement(model):
    return float(np.mean(np.argmax(np.asarray(model.predict(xt, verbose=0)), 1)
                         == np.argmax(np.asarray(teacher.predict(xt, verbose=0)), 1)))


result = {"backend": keras.backend.backend()}
for weight in (1.0,):  # the control (weight 0.05) runs under TensorFlow
    keras.utils.set_random_seed(1)
    student = co.prune(models.mnist_cnn((8, 8, 1)), 0.5, verbose=False)
    trainer = co.distill(student, teacher, temperature=2.0, weight=weight)
    trainer.compile(keras.optimizers.AdamW(3e-3, weight_decay=0.05), loss)
    trainer.fit(x, noise, epochs=4, batch_size=32, verbose=0)
    plain = co.strip(student)
    result[f"agreement_{weight}"] = agreement(student)
    result[f"sparsity_{weight}"] = float(np.mean(plain.get_layer("conv2").kernel.numpy() == 0))
result["teacher_unchanged"] = all(np.array_equal(a, b)
                                  for a, b in zip(before, teacher.get_weights(), strict=True))
print(json.dumps(result))
