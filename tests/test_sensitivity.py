"""co.sensitivity: the metric drop of each optimizable weight alone, on real data."""

import keras
import numpy as np
import pytest

import collabopt as co


def test_per_layer_drops_on_the_trained_digits_cnn(tmp_path, trained, digits):
    _, (xt, yt) = digits
    before = [w.numpy().copy() for w in trained.weights]
    result = co.sensitivity(trained, (xt, yt), sparsities=(0.5, 0.95), clusters=(2, 16),
                            verbose=False)
    assert result.metric == "accuracy" and result.higher_is_better
    assert result.base == pytest.approx(np.mean(trained.predict(xt, verbose=0).argmax(1) == yt))
    assert result.settings == ["prune 50%", "prune 95%", "cluster 2", "cluster 16", "int8"]
    names = [s.layer for s in result.layers]
    assert len(names) >= 3 and len(set(names)) == len(names)
    for s in result.layers:  # int8 rounding of one weight barely moves top-1
        assert -0.05 < s.drops["int8"] < 0.02, s
    # harsher settings hurt more, summed over the model
    total = {k: sum(s.drops[k] for s in result.layers) for k in result.settings}
    assert total["prune 95%"] > total["prune 50%"] and total["cluster 2"] > total["cluster 16"]
    assert max(s.drops["prune 95%"] for s in result.layers) > 0.1  # some layer cannot take 95 %
    # the model is untouched afterwards
    for w, b in zip(trained.weights, before, strict=True):
        np.testing.assert_array_equal(w.numpy(), b)
    spare = result.sensitive(0.1, "prune 95%")
    assert spare and set(spare) <= set(names)
    with pytest.raises(ValueError, match="no setting"):
        result.sensitive(0.1, "prune 99%")
    png = result.plot(tmp_path / "sensitivity.png")
    assert png.stat().st_size > 5000


def test_a_regression_metric_lower_is_better(digits):
    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    model = keras.Model(inp, keras.layers.Dense(1, name="out")(
        keras.layers.Dense(16, activation="relu", name="hidden")(keras.layers.Flatten()(inp))))
    target = y.astype("float32") / 9
    model.compile("adam", "mse")
    model.fit(x, target, epochs=5, verbose=0)
    result = co.sensitivity(model, (x, target), metric="mse", sparsities=(0.9,),
                            clusters=(2,), verbose=False)
    assert result.metric == "mse" and not result.higher_is_better
    # pruning 90 % of a trained layer raises the error: a positive drop means worse
    assert all(s.drops["prune 90%"] > 0 for s in result.layers), result.table()

    def mean_abs(y_true, y_pred):
        return float(np.mean(np.abs(y_true - y_pred[:, 0])))

    with pytest.raises(ValueError, match="higher_is_better"):
        co.sensitivity(model, (x, target), metric=mean_abs)
    custom = co.sensitivity(model, (x, target), metric=mean_abs, higher_is_better=False,
                            sparsities=(0.9,), clusters=(), int8=False, verbose=False)
    assert custom.metric == "mean_abs" and custom.settings == ["prune 90%"]
    assert all(s.drops["prune 90%"] > 0 for s in custom.layers)


def test_bad_arguments_say_what_is_wrong(trained, digits):
    _, (xt, yt) = digits
    with pytest.raises(ValueError, match="samples"):
        co.sensitivity(trained, (xt, yt[:5]), verbose=False)
    with pytest.raises(ValueError, match="sparsities"):
        co.sensitivity(trained, (xt, yt), sparsities=(1.5,), verbose=False)
    with pytest.raises(ValueError, match="unknown metric"):
        co.sensitivity(trained, (xt, yt), metric="no_such_metric", verbose=False)
