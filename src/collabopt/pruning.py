"""Magnitude pruning (Zhu & Gupta schedules), unstructured or m:n structured.

The mask is a transform state: recomputed every ``frequency`` training steps inside
``[begin_step, end_step]`` from the magnitudes of the *already masked* weight, so a weight once
pruned never grows back as sparsity rises, then frozen. Step counting lives in the wrapper,
so no callback is needed under ``fit`` or in a custom loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
from keras import ops

from collabopt.core import registry
from collabopt.core.rewrite import LayerSelector, apply_to_model
from collabopt.core.transform import Transform


@dataclass(frozen=True)
class ConstantSparsity:
    """Prune to ``target`` at ``begin_step`` and keep re-pruning every ``frequency`` steps."""

    target: float
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100

    def __post_init__(self):
        _check_fraction(self.target, "target")
        _check_steps(self.begin_step, self.end_step, self.frequency)

    def sparsity(self, step):
        return ops.cast(self.target, "float32") + 0.0 * ops.cast(step, "float32")


@dataclass(frozen=True)
class PolynomialDecay:
    """Zhu & Gupta (2017): sparsity rises from ``initial`` to ``final`` as a power curve."""

    initial: float
    final: float
    begin_step: int
    end_step: int
    power: float = 3
    frequency: int = 100

    def __post_init__(self):
        _check_fraction(self.initial, "initial")
        _check_fraction(self.final, "final")
        _check_steps(self.begin_step, self.end_step, self.frequency)
        if self.end_step < 0:
            raise ValueError("PolynomialDecay needs an end_step >= begin_step (got -1)")

    def sparsity(self, step):
        span = max(self.end_step - self.begin_step, 1)
        p = ops.clip((ops.cast(step, "float32") - self.begin_step) / span, 0.0, 1.0)
        return self.final + (self.initial - self.final) * (1.0 - p) ** self.power


Schedule = ConstantSparsity | PolynomialDecay


def _check_fraction(value, name):
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"sparsity {name} must be a number in [0, 1), got {value!r}")


def _check_steps(begin, end, frequency):
    if begin < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin}")
    if end != -1 and end < begin:
        raise ValueError(f"end_step ({end}) must be >= begin_step ({begin}), or -1 for never")
    if frequency < 1:
        raise ValueError(f"frequency must be >= 1, got {frequency}")


def _schedule_from_config(config: dict) -> Schedule:
    config = dict(config)
    kind = config.pop("kind")
    return {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}[kind](
        **config)


def magnitude_mask(w, sparsity):
    """1 where |w| is above the ``sparsity`` quantile of |w|, else 0 (keras.ops)."""
    flat = ops.reshape(ops.abs(w), (-1,))
    n = flat.shape[0]
    k = ops.cast(ops.floor(sparsity * n), "int32")
    ordered = ops.sort(flat)
    threshold = ops.where(k > 0, ops.take(ordered, ops.maximum(k - 1, 0)), -1.0)
    return ops.cast(ops.abs(w) > threshold, w.dtype)


def m_by_n_mask(w, m: int, n: int, reduction_axes: tuple[int, ...]):
    """Keep the ``m`` largest of every ``n`` consecutive weights along the reduction axes."""
    shape = w.shape
    rank = len(shape)
    red = [a % rank for a in reduction_axes]
    rest = [a for a in range(rank) if a not in red]
    perm = rest + red
    moved = ops.transpose(ops.abs(w), perm)
    lead = [shape[a] for a in rest]
    length = int(np.prod([shape[a] for a in red]))
    flat = ops.reshape(moved, (-1, length))
    pad = (-length) % n
    if pad:
        flat = ops.pad(flat, [[0, 0], [0, pad]], constant_values=-1.0)
    groups = ops.reshape(flat, (flat.shape[0], -1, n))
    rank_in_group = ops.argsort(ops.argsort(groups, axis=-1), axis=-1)
    keep = ops.cast(rank_in_group >= n - m, w.dtype)
    keep = ops.reshape(keep, (flat.shape[0], -1))[:, :length]
    keep = ops.reshape(keep, lead + [shape[a] for a in red])
    return ops.transpose(keep, [perm.index(i) for i in range(rank)])


@keras.saving.register_keras_serializable(package="collabopt")
class PruneMask(Transform):
    """``w * mask``; the mask follows the schedule (or m:n pattern), then freezes."""

    def __init__(self, schedule: dict, m_by_n=None, **kwargs):
        super().__init__(**kwargs)
        self.schedule_config = dict(schedule)
        self.schedule = _schedule_from_config(schedule)
        self.m_by_n = tuple(m_by_n) if m_by_n else None

    def build_for(self, shape):
        self.mask = self.add_weight(name="mask", shape=shape, initializer="ones",
                                    trainable=False, aggregation="only_first_replica")
        super().build_for(shape)

    def _new_mask(self, w, step):
        masked = w * self.mask
        if self.m_by_n:
            return m_by_n_mask(masked, *self.m_by_n, self.reduction_axes)
        return magnitude_mask(masked, self.schedule.sparsity(step))

    def _due(self, step):
        s = self.schedule
        due = (step >= s.begin_step) & (ops.mod(step - s.begin_step, s.frequency) == 0)
        if s.end_step >= 0:
            due = due & (step <= s.end_step)
        return due

    def initialize(self, weight):
        if self.schedule.begin_step == 0:  # one-shot pruning works without any training
            self.mask.assign(self._new_mask(ops.convert_to_tensor(weight), 0))

    def update(self, w, step):
        new = ops.cond(self._due(step), lambda: self._new_mask(w, step), lambda: self.mask.value)
        self.mask.assign(new)

    def apply(self, w, training=False):
        return w * ops.cast(self.mask, w.dtype)

    def get_config(self):
        return {**super().get_config(), "schedule": self.schedule_config,
                "m_by_n": list(self.m_by_n) if self.m_by_n else None}


def _schedule(sparsity, m_by_n) -> Schedule:
    if m_by_n is not None:
        if (not isinstance(m_by_n, (tuple, list)) or len(m_by_n) != 2
                or not all(isinstance(v, int) for v in m_by_n)):
            raise ValueError(f"m_by_n must be a pair of ints (m, n), got {m_by_n!r}")
        m, n = m_by_n
        if not 0 < m < n:
            raise ValueError(f"m_by_n=({m}, {n}): need 0 < m < n (keep m of every n weights)")
        implied = 1.0 - m / n
        if sparsity is None:
            return ConstantSparsity(implied, 0)
        if isinstance(sparsity, (int, float)):
            if abs(float(sparsity) - implied) > 1e-9:
                raise ValueError(f"sparsity={sparsity} contradicts m_by_n={tuple(m_by_n)} "
                                 f"(which means {implied:g}); pass one or the other")
            return ConstantSparsity(implied, 0)
    if sparsity is None:
        raise ValueError("prune() needs sparsity= (a float or a schedule) or m_by_n=")
    if isinstance(sparsity, (ConstantSparsity, PolynomialDecay)):
        return sparsity
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError("sparsity must be a float in [0, 1), co.ConstantSparsity or "
                        f"co.PolynomialDecay, got {type(sparsity).__name__}")
    return ConstantSparsity(float(sparsity), 0)


def prune(
    model: keras.Model,
    sparsity: float | Schedule | None = None,
    m_by_n: tuple[int, int] | None = None,
    layers: LayerSelector = None,
    verbose: bool = True,
) -> keras.Model:
    """Return a copy of ``model`` whose selected kernels are magnitude-pruned during training.

    Train it with plain ``fit`` or a custom loop, then :func:`collabopt.strip` it.
    """
    schedule = _schedule(sparsity, m_by_n)
    config = {"kind": type(schedule).__name__, **asdict(schedule)}

    def make_chains(layer, specs: list[registry.WeightSpec], explicit):
        return {s.name: [PruneMask(config, m_by_n=m_by_n, channel_axes=s.channel_axes,
                                   reduction_axes=s.reduction_axes)] for s in specs}

    return apply_to_model(model, "prune", make_chains, layers=layers, verbose=verbose)


def fixed_mask(sparsity: float, **axes) -> PruneMask:
    """A mask set once, at the first step, on the zeros a pruned weight already holds, then
    frozen: what keeps them through later training (QAT, a cluster node's fine-tune)."""
    return PruneMask({"kind": "ConstantSparsity", "target": float(sparsity), "begin_step": 0,
                      "end_step": 0, "frequency": 1}, **axes)


def keep_zeros(model: keras.Model, layers: LayerSelector = None,
               verbose: bool = False) -> keras.Model:
    """Return a copy of ``model`` whose selected sparse kernels keep their zeros in training.

    A pruned layer that the next step leaves alone (out of ``co.cluster(layers=)``, spared by
    ``layer_policy="auto"`` or a search) has nothing else holding its zeros: one epoch of
    the cluster fine-tune took a 55 %-pruned conv of the MNIST CNN to 16 % zeros. Returns
    ``model`` itself when no selected kernel holds zeros.
    """
    from collabopt.core import structure
    from collabopt.core.rewrite import iter_layers, layer_matcher

    match, _ = layer_matcher(layers)
    sparsity = {}  # (layer, weight) -> its zeros' share, each weight measured once
    for layer in iter_layers(model):
        if match is None or match(layer):
            for s in registry.weight_specs(layer) or ():
                st = structure.detect(registry.find_variable(layer, s.name).numpy(),
                                      s.channel_axes)
                if st.sparse:
                    sparsity[layer.name, s.name] = st.sparsity
    if not sparsity:
        return model

    def make_chains(layer, specs, explicit):
        chains = {s.name: [fixed_mask(sparsity[layer.name, s.name], channel_axes=s.channel_axes,
                                      reduction_axes=s.reduction_axes)]
                  for s in specs if (layer.name, s.name) in sparsity}
        return chains or "no zeros to keep"

    return apply_to_model(model, "keep_zeros", make_chains, layers=layers, verbose=verbose)
