import keras
import pytest

from collabopt import models


@pytest.mark.parametrize("size,low,high", [("S", 20e3, 40e3), ("M", 120e3, 200e3),
                                           ("L", 400e3, 550e3)])
def test_ds_cnn_sizes(size, low, high):
    m = models.ds_cnn(size)
    assert low <= m.count_params() <= high
    assert m.output_shape == (None, 12)
    assert sum(isinstance(layer, keras.layers.DepthwiseConv2D) for layer in m.layers) == (
        5 if size == "L" else 4)


def test_mobilenet_matches_keras_applications():
    ours = models.mobilenet_v1(0.25, (32, 32, 3), 10)
    ref = keras.applications.MobileNet(alpha=0.25, weights=None, input_shape=(32, 32, 3),
                                       classes=10)
    assert ours.count_params() == ref.count_params()
    assert models.mobilenet_v1().count_params() == 4_253_864


def test_resnet8_and_mnist_cnn():
    assert models.resnet8().count_params() == 78_666
    assert models.mnist_cnn().count_params() == 20_634
    assert models.mnist_cnn((8, 8, 1)).output_shape == (None, 10)


def test_bad_size():
    with pytest.raises(ValueError, match="size"):
        models.ds_cnn("XL")
