"""What "better" means for a model: a metric, its name and its direction.

One resolution rule for every place that scores a model (``co.sensitivity`` today), so a
metric given as a Keras name, a Keras metric object or a plain ``(y_true, y_pred) -> float``
callable is scored the same way on Keras outputs and on ``.tflite`` outputs alike: always on
predictions as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# names whose direction is known; anything else needs higher_is_better
_HIGHER = ("accuracy", "auc", "precision", "recall", "f1", "iou", "r2", "top_k")
_LOWER = ("error", "loss", "crossentropy", "hinge", "divergence", "mse", "mae", "mape",
          "msle", "poisson", "cosh")


@dataclass(frozen=True)
class Metric:
    """A scoring function on numpy ``(y_true, y_pred)`` with its name and direction."""

    name: str
    score: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool

    def drop(self, base: float, value: float) -> float:
        """How much worse ``value`` is than ``base`` (positive: worse), in metric units."""
        return base - value if self.higher_is_better else value - base


def top1(y_true, y_pred) -> float:
    """Top-1 accuracy for integer or one-hot labels (one sigmoid output: threshold 0.5)."""
    y_pred = np.asarray(y_pred).reshape(len(y_pred), -1)
    y_true = np.asarray(y_true)
    if y_true.ndim > 1 and y_true.shape[-1] == y_pred.shape[-1] > 1:
        y_true = y_true.argmax(-1)
    y_true = y_true.reshape(-1)
    pred = (y_pred[:, 0] > 0.5).astype(int) if y_pred.shape[1] == 1 else y_pred.argmax(1)
    return float(np.mean(pred == y_true))


def _per_output(score: Callable) -> Callable:
    """``score`` on each output of a multi-output model (lists of labels and predictions,
    in the model's output order), averaged; a callable metric instead gets the lists."""
    def scored(y_true, y_pred):
        if isinstance(y_pred, (list, tuple)):
            if not isinstance(y_true, (list, tuple)) or len(y_true) != len(y_pred):
                raise ValueError(f"the model has {len(y_pred)} outputs: give one label array "
                                 "per output, in the same order")
            return float(np.mean([score(t, p) for t, p in zip(y_true, y_pred, strict=True)]))
        return score(y_true, y_pred)

    return scored


def _direction(name: str) -> bool | None:
    key = name.lower()
    if any(word in key for word in _LOWER):
        return False
    if any(word in key for word in _HIGHER):
        return True
    return None


def resolve(metric=None, higher_is_better: bool | None = None) -> Metric:
    """``None`` or ``"accuracy"``: top-1; a Keras metric name or object; or a callable."""
    import keras

    if isinstance(metric, Metric):
        return metric
    if metric is None or metric in ("accuracy", "top1", "top_1"):
        return Metric("accuracy", _per_output(top1),
                      True if higher_is_better is None else higher_is_better)
    label = metric if isinstance(metric, str) else None  # the user's own word for it
    if isinstance(metric, str):
        try:
            metric = keras.metrics.get(metric)
        except ValueError as err:
            raise ValueError(f"unknown metric {metric!r}: give a Keras metric name "
                             "('mse', 'auc', ...), a keras.metrics.Metric or a callable "
                             "(y_true, y_pred) -> float") from err
        if isinstance(metric, type):
            metric = metric()
    if isinstance(metric, keras.metrics.Metric):
        obj = metric

        def one(y_true, y_pred):
            obj.reset_state()
            obj.update_state(y_true, y_pred)
            return float(keras.ops.convert_to_numpy(obj.result()))

        score = _per_output(one)
        name = obj.name
    elif callable(metric):
        fn = metric

        def score(y_true, y_pred):
            value = fn(y_true, y_pred)
            return float(np.mean(keras.ops.convert_to_numpy(value)))

        name = getattr(metric, "__name__", type(metric).__name__)
    else:
        raise TypeError(f"metric must be a name, a keras.metrics.Metric or a callable, got "
                        f"{type(metric).__name__}")
    name = label or name
    direction = _direction(name) if higher_is_better is None else bool(higher_is_better)
    if direction is None:
        raise ValueError(f"metric {name!r}: say whether higher is better "
                         "(higher_is_better=True or False)")
    return Metric(name, score, direction)
