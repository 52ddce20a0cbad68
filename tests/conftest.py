"""Shared fixtures: real data (8x8 digits) and a small trained model, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from collabopt import datasets, models  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    return datasets.digits()


def compile_model(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.fixture(scope="session")
def trained(digits):
    """mnist_cnn on the 8x8 digits, trained to ~95%: the baseline for every technique."""
    (x, y), (xt, yt) = digits
    keras.utils.set_random_seed(0)
    model = compile_model(models.mnist_cnn((8, 8, 1)))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


def tiny_conv_model(name="tiny"):
    """Conv + depthwise + dense on 8x8 inputs, no batch norm (fast, deterministic)."""
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(10, name="dense")(x)
    return keras.Model(inp, out, name=name)


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(model, before):
    after = model.get_weights()
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
