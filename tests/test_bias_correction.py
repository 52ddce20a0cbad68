import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.bias_correction import _channel_means

from .conftest import tiny_conv_model, weights_of


def _accuracy(model, x, y):
    return float((model.predict(x, verbose=0).argmax(1) == y).mean())


def test_correct_bias_restores_channel_means_and_keeps_codebooks(tmp_path, trained, digits):
    (x, y), (xt, yt) = digits
    folded = co.fold_batchnorm(trained)
    reference_weights = weights_of(folded)
    clustered = co.cluster(folded, 3, verbose=False)
    kernels = [w.copy() for w in co.strip(clustered).get_weights() if w.ndim > 1]
    before = _accuracy(clustered, xt, yt)

    names = co.correct_bias(clustered, folded, x[:500])

    assert names == ["conv1", "conv2", "logits"]
    for name in names:  # pre-activation means per channel, as in the reference again
        np.testing.assert_allclose(_channel_means(clustered, name, x[:500], 256),
                                   _channel_means(folded, name, x[:500], 256), atol=1e-4)
    after = _accuracy(clustered, xt, yt)
    assert after > before + 0.1, (before, after)  # measured: 0.64 -> 0.93
    for a, b in zip(kernels, [w for w in co.strip(clustered).get_weights() if w.ndim > 1],
                    strict=True):
        np.testing.assert_array_equal(a, b)  # only biases moved
    for a, b in zip(reference_weights, folded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # and the 3-value codebooks survive into the int8 file
    path = co.export_tflite(clustered, tmp_path / "bc.tflite", representative_data=x[:100],
                            per_channel_weights=False)
    co.verify(path, clustered)
    assert max(t.unique for t in co.inspect(path).tensors) <= 3


def test_correct_bias_selection_and_bad_input(trained, digits):
    (x, _), _ = digits
    folded = co.fold_batchnorm(trained)
    clustered = co.cluster(folded, 4, verbose=False)
    assert co.correct_bias(clustered, folded, x[:64], layers=["logits"]) == ["logits"]
    assert co.correct_bias(clustered, folded, x[:64],
                           layers=keras.layers.Conv2D) == ["conv1", "conv2"]
    with pytest.raises(ValueError, match="does not have"):
        co.correct_bias(clustered, folded, x[:64], layers=["nope"])
    with pytest.raises(ValueError, match="few hundred inputs"):
        co.correct_bias(clustered, folded, x[:0])


def test_fused_activations_are_corrected_before_the_activation(digits):
    """conv/dw/pw apply ReLU themselves: the means that must match are the ones before it."""
    (x, _), _ = digits
    keras.utils.set_random_seed(0)
    reference = tiny_conv_model()
    clustered = co.cluster(reference, 3, verbose=False)
    assert co.correct_bias(clustered, reference, x[:300]) == ["conv", "dw", "pw", "dense"]
    for name in ("conv", "dw", "pw", "dense"):
        np.testing.assert_allclose(_channel_means(clustered, name, x[:300], 256),
                                   _channel_means(reference, name, x[:300], 256), atol=1e-4)
    assert reference.get_layer("conv").activation is keras.activations.relu  # restored
