"""Reference models (Functional Keras 3) with the published architectures.

Batch norm uses momentum 0.9 by default: with the short fine-tunes of an optimization
pipeline, Keras' 0.99 leaves the moving statistics unsettled.
"""

from __future__ import annotations

import keras
from keras import layers

_DS_CNN = {  # Zhang et al. 2017, "Hello Edge", Table 3 / ARM ML-KWS model_size_info
    "S": (64, 4, (2, 2)),
    "M": (172, 4, (2, 2)),
    "L": (276, 5, (2, 1)),
}


def _bn(name: str, momentum: float):
    return layers.BatchNormalization(momentum=momentum, name=name)


def ds_cnn(size: str = "L", input_shape=(49, 10, 1), classes: int = 12,
           bn_momentum: float = 0.9) -> keras.Model:
    """Depthwise-separable CNN for keyword spotting (DS-CNN S/M/L).

    A 10x4 convolution, then 4 (S, M) or 5 (L) depthwise 3x3 + pointwise 1x1 blocks, each
    followed by batch norm and ReLU; global average pooling; a dense classifier.
    Parameters: S 24 K, M 140 K, L 420 K (the paper quotes 38.6 K / 189 K / 498 K, counting
    differently; the layer shapes here are those of ARM ML-KWS model_size_info).
    """
    if size not in _DS_CNN:
        raise ValueError(f"size must be one of {sorted(_DS_CNN)}, got {size!r}")
    width, blocks, first_stride = _DS_CNN[size]
    inp = keras.Input(input_shape, name="features")
    x = layers.Conv2D(width, (10, 4), strides=first_stride, padding="same", use_bias=False,
                      name="conv_1")(inp)
    x = _bn("conv_1_bn", bn_momentum)(x)
    x = layers.ReLU(name="conv_1_relu")(x)
    for i in range(1, blocks + 1):
        x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"dw_{i}")(x)
        x = _bn(f"dw_{i}_bn", bn_momentum)(x)
        x = layers.ReLU(name=f"dw_{i}_relu")(x)
        x = layers.Conv2D(width, 1, use_bias=False, name=f"pw_{i}")(x)
        x = _bn(f"pw_{i}_bn", bn_momentum)(x)
        x = layers.ReLU(name=f"pw_{i}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, out, name=f"ds_cnn_{size.lower()}")


def mobilenet_v1(alpha: float = 1.0, input_shape=(224, 224, 3), classes: int = 1000,
                 dropout: float = 1e-3, bn_momentum: float = 0.9) -> keras.Model:
    """MobileNet v1 (Howard et al. 2017); same layer structure and parameter count as
    ``keras.applications.MobileNet`` (4.25 M at alpha 1.0, 1000 classes)."""
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]
    inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(int(32 * alpha), 3, strides=2, padding="same", use_bias=False,
                      name="conv1")(inp)
    x = _bn("conv1_bn", bn_momentum)(x)
    x = layers.ReLU(6.0, name="conv1_relu")(x)
    for i, (filters, stride) in enumerate(plan, start=1):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                   name=f"conv_dw_{i}")(x)
        x = _bn(f"conv_dw_{i}_bn", bn_momentum)(x)
        x = layers.ReLU(6.0, name=f"conv_dw_{i}_relu")(x)
        x = layers.Conv2D(int(filters * alpha), 1, use_bias=False, name=f"conv_pw_{i}")(x)
        x = _bn(f"conv_pw_{i}_bn", bn_momentum)(x)
        x = layers.ReLU(6.0, name=f"conv_pw_{i}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    out = layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, out, name=f"mobilenet_v1_{alpha:g}")


def resnet8(input_shape=(32, 32, 3), classes: int = 10, bn_momentum: float = 0.9) -> keras.Model:
    """ResNet-8, the MLPerf Tiny image-classification model (78.7 K parameters)."""
    reg = keras.regularizers.L2(1e-4)
    inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(16, 3, padding="same", kernel_regularizer=reg, name="conv0")(inp)
    x = _bn("conv0_bn", bn_momentum)(x)
    x = layers.ReLU(name="conv0_relu")(x)
    for stack, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        y = layers.Conv2D(filters, 3, strides=stride, padding="same", kernel_regularizer=reg,
                          name=f"s{stack}_conv1")(x)
        y = _bn(f"s{stack}_bn1", bn_momentum)(y)
        y = layers.ReLU(name=f"s{stack}_relu1")(y)
        y = layers.Conv2D(filters, 3, padding="same", kernel_regularizer=reg,
                          name=f"s{stack}_conv2")(y)
        y = _bn(f"s{stack}_bn2", bn_momentum)(y)
        if stride != 1:
            x = layers.Conv2D(filters, 1, strides=stride, padding="same",
                              kernel_regularizer=reg, name=f"s{stack}_shortcut")(x)
        x = layers.Add(name=f"s{stack}_add")([x, y])
        x = layers.ReLU(name=f"s{stack}_relu2")(x)
    x = layers.AveragePooling2D(pool_size=x.shape[1:3], name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, out, name="resnet8")


def mnist_cnn(input_shape=(28, 28, 1), classes: int = 10, bn_momentum: float = 0.9
              ) -> keras.Model:
    """A small CNN for MNIST (and, with ``input_shape=(8, 8, 1)``, the 8x8 digits): two
    conv + batch norm + ReLU stages, max pooling, a dense classifier (20.6 K parameters at
    28x28)."""
    inp = keras.Input(input_shape, name="image")
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = _bn("conv1_bn", bn_momentum)(x)
    x = layers.ReLU(name="conv1_relu")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False, name="conv2")(x)
    x = _bn("conv2_bn", bn_momentum)(x)
    x = layers.ReLU(name="conv2_relu")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(classes, name="logits")(x)
    return keras.Model(inp, out, name="mnist_cnn")
