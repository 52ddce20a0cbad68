"""Models shaped like the ones users bring, at small input sizes: every technique is tested
on each (``tests/test_zoo.py``) and ``benchmarks/bench_models.py`` tabulates them.

``ZOO`` maps a name to a builder returning ``(model, sample_inputs, labels)``: the inputs
are real-shaped random data (tokens for the text model), enough to train a few steps and to
calibrate. ``keras.applications`` networks are built with ``weights=None`` and the smallest
width multiplier and input size each accepts.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from collabopt.batchnorm import settle_batchnorm

CLASSES = 4


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, size, size, 3)).astype("float32"), rng.integers(0, CLASSES, n)


def _app(builder, size=32, **kwargs):
    def build(n=8, logits=False):
        """``logits``: no softmax on the classifier (whose near-uniform outputs on random
        weights would hide any difference between a file and its model)."""
        model = builder(input_shape=(size, size, 3), weights=None, classes=CLASSES,
                        classifier_activation=None if logits else "softmax", **kwargs)
        x, y = _images(n, size)
        # with their initial moving statistics a deep random network's signal vanishes
        # (MobileNet logits ~1e-18), and a file cannot be told from its model on zeros
        settle_batchnorm(model, [x])
        return model, x, y
    build.application = True
    return build


@keras.saving.register_keras_serializable(package="collabopt_zoo")
class ResidualBlock(keras.layers.Layer):
    """A user's own block: conv + batch norm + ReLU twice and a skip, held as attributes."""

    def __init__(self, filters: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv_a = layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.bn_a = layers.BatchNormalization()
        self.conv_b = layers.Conv2D(filters, 3, padding="same")
        self.relu = layers.ReLU()

    def call(self, x, training=None):
        y = self.relu(self.bn_a(self.conv_a(x), training=training))
        return self.relu(x + self.conv_b(y))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def custom_block(n=8):
    inp = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = ResidualBlock(8, name="block")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(CLASSES, name="head")(x)
    return (keras.Model(inp, out, name="custom_block"), *_images(n, 16))


@keras.saving.register_keras_serializable(package="collabopt_zoo")
class SubclassedNet(keras.Model):
    """The common subclassing pattern: ``__init__(self)`` and no ``get_config``."""

    def __init__(self):
        super().__init__()
        self.conv = layers.Conv2D(8, 3, activation="relu")
        self.pool = layers.GlobalAveragePooling2D()
        self.head = layers.Dense(CLASSES)

    def call(self, x, training=None):  # without it Keras runs every layer in inference mode
        return self.head(self.pool(self.conv(x)))


def subclassed(n=8):
    model = SubclassedNet()
    x, y = _images(n, 16)
    model(x[:1])
    return model, x, y


def _audio(n, frames=49, features=10, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, frames, features)).astype("float32"),
            rng.integers(0, CLASSES, n))


def lstm_kws(n=8, frames=49):
    """``frames``: sequence length (the export unrolls it: its cost grows with it)."""
    inp = keras.Input((frames, 10))
    x = layers.Conv1D(16, 3, padding="same", activation="relu", name="conv")(inp)
    x = layers.LSTM(16, name="lstm")(x)
    out = layers.Dense(CLASSES, name="head")(x)
    return (keras.Model(inp, out, name="lstm_kws"), *_audio(n, frames))


def gru_kws(n=8, frames=49):
    inp = keras.Input((frames, 10))
    x = layers.GRU(16, return_sequences=True, name="gru1")(inp)
    x = layers.Bidirectional(layers.GRU(8), name="bigru")(x)
    out = layers.Dense(CLASSES, name="head")(x)
    return (keras.Model(inp, out, name="gru_kws"), *_audio(n, frames))


def keyword_transformer(n=8, dim=16, heads=2):
    inp = keras.Input((49, 10))
    x = layers.Dense(dim, name="embed")(inp)
    a = layers.MultiHeadAttention(heads, dim // heads, name="mha")(x, x)
    x = layers.LayerNormalization(name="ln1")(x + a)
    f = layers.Dense(2 * dim, activation="gelu", name="ffn1")(x)
    f = layers.Dense(dim, name="ffn2")(f)
    x = layers.LayerNormalization(name="ln2")(x + f)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(CLASSES, name="head")(x)
    return (keras.Model(inp, out, name="keyword_transformer"), *_audio(n))


def conv1d_audio(n=8):
    inp = keras.Input((49, 10))
    x = layers.Conv1D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv1D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.ReLU()(x)
    x = layers.Conv1D(16, 1, name="pw")(x)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(CLASSES, name="head")(x)
    return (keras.Model(inp, out, name="conv1d_audio"), *_audio(n))


def text_cnn(n=8, vocab=100, length=20):
    inp = keras.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, 16, name="embedding")(inp)
    x = layers.Conv1D(16, 3, activation="relu", name="conv")(x)
    x = layers.GlobalMaxPooling1D()(x)
    out = layers.Dense(CLASSES, name="head")(x)
    rng = np.random.default_rng(0)
    return (keras.Model(inp, out, name="text_cnn"),
            rng.integers(0, vocab, (n, length)).astype("int32"), rng.integers(0, CLASSES, n))


A = keras.applications
ZOO: dict[str, Callable[..., tuple[keras.Model, np.ndarray, np.ndarray]]] = {
    "MobileNet": _app(A.MobileNet, alpha=0.25),
    "MobileNetV2": _app(A.MobileNetV2, alpha=0.35),
    "MobileNetV3Small": _app(A.MobileNetV3Small, alpha=0.75),
    "MobileNetV3Large": _app(A.MobileNetV3Large, alpha=0.75),
    "EfficientNetB0": _app(A.EfficientNetB0),
    "EfficientNetV2B0": _app(A.EfficientNetV2B0),
    "ResNet50": _app(A.ResNet50),
    "lstm_kws": lstm_kws,
    "gru_kws": gru_kws,
    "keyword_transformer": keyword_transformer,
    "conv1d_audio": conv1d_audio,
    "text_cnn": text_cnn,
    "custom_block": custom_block,
    "subclassed": subclassed,
}
