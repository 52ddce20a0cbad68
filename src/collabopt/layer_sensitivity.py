"""Per-layer sensitivity: which layers can take pruning, clustering and int8, and which not.

The reference guide's advice is to "skip the critical layers" by hand. ``sensitivity``
measures them: each optimizable weight alone is pruned (magnitude), clustered (exact 1-D
k-means) or rounded to int8 (symmetric, per channel where QAT would be), with no
fine-tuning, and the metric's drop is recorded. Every other weight keeps its value, and the
model's own weights are restored afterwards, even when the run is interrupted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from collabopt.metrics import Metric, resolve


@dataclass
class LayerSensitivity:
    """The metric drop (positive: worse) of one weight per setting ("prune 50%",
    "cluster 16", "int8")."""

    layer: str
    weight: str
    size: int
    drops: dict[str, float] = field(default_factory=dict)


@dataclass
class Sensitivity:
    """What ``co.sensitivity`` measured; ``sensitive(...)`` names the layers to spare."""

    metric: str
    higher_is_better: bool
    base: float
    settings: list[str]
    layers: list[LayerSensitivity]

    def table(self) -> list[dict]:
        return [{"layer": s.layer, "weight": s.weight, "size": s.size, **s.drops}
                for s in self.layers]

    def sensitive(self, max_drop: float, setting: str | None = None) -> list[str]:
        """Layers whose drop exceeds ``max_drop`` at ``setting`` (default: any setting)."""
        keys = self.settings if setting is None else [setting]
        unknown = set(keys) - set(self.settings)
        if unknown:
            raise ValueError(f"no setting {sorted(unknown)}; measured: {self.settings}")
        return sorted({s.layer for s in self.layers
                       if any(s.drops[k] > max_drop for k in keys)})

    def plot(self, out: str | os.PathLike) -> Path:
        """One bar group per layer, one bar per setting: the metric drop. Returns the PNG."""
        from collabopt.plots import _plt

        plt = _plt()
        n = len(self.layers)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * n * len(self.settings) ** 0.5 + 3), 3.8))
        width = 0.8 / len(self.settings)
        for i, key in enumerate(self.settings):
            ax.bar(np.arange(n) + i * width, [s.drops[key] for s in self.layers], width,
                   label=key)
        ax.set_xticks(np.arange(n) + 0.4 - width / 2)
        ax.set_xticklabels([s.layer for s in self.layers], rotation=60, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(f"{self.metric} drop (base {self.base:.4g})")
        ax.set_title("per-layer sensitivity, no fine-tuning", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def sensitivity(model, data, metric=None, higher_is_better: bool | None = None,
                sparsities: Sequence[float] = (0.5, 0.75, 0.9),
                clusters: Sequence[int] = (8, 16), int8: bool = True,
                batch_size: int = 256, verbose: bool = True) -> Sensitivity:
    """The metric drop of ``model`` on ``data = (x, y)`` when each optimizable weight alone is
    pruned to each of ``sparsities``, clustered to each of ``clusters`` values, or rounded to
    int8. ``metric``: top-1 by default, or a Keras metric name / object, or a callable
    ``(y_true, y_pred) -> float`` (then say ``higher_is_better``)."""
    from collabopt.core import registry
    from collabopt.core.rewrite import ensure_built, iter_layers

    scorer = resolve(metric, higher_is_better)
    x, y = _unpack(data)
    for s in sparsities:
        if not 0 < s < 1:
            raise ValueError(f"sparsities must lie in (0, 1), got {s!r}")
    for k in clusters:
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"clusters must be integers >= 2, got {k!r}")
    ensure_built(model)
    targets = [(layer, spec, registry.find_variable(layer, spec.name))
               for layer in iter_layers(model) for spec in registry.weight_specs(layer) or ()]
    if not targets:
        raise ValueError(f"model {model.name!r} has no layer with optimizable weights "
                         "(see co.register_layer for your own layer kinds)")
    settings = ([f"prune {s:.0%}" for s in sparsities] + [f"cluster {k}" for k in clusters]
                + (["int8"] if int8 else []))

    def score() -> float:
        return scorer.score(y, model.predict(x, batch_size=batch_size, verbose=0))

    base = score()
    rows = []
    progress = None
    if verbose:
        from keras.utils import Progbar

        progress = Progbar(len(targets) * len(settings), unit_name="measurement")
    for layer, spec, variable in targets:
        original = np.asarray(variable.numpy())
        row = LayerSensitivity(layer.name, spec.name, int(original.size))
        try:
            for key, w in _variants(original, spec, sparsities, clusters, int8, settings):
                variable.assign(w)
                row.drops[key] = scorer.drop(base, score())
                if progress is not None:
                    progress.add(1)
        finally:
            variable.assign(original)
        rows.append(row)
    return Sensitivity(scorer.name, scorer.higher_is_better, base, settings, rows)


def _unpack(data):
    try:
        x, y = data
    except (TypeError, ValueError) as err:
        raise ValueError("data must be a pair (x, y) of arrays") from err
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    return x, y


def _variants(w, spec, sparsities, clusters, int8, settings):
    """Each setting's version of ``w``, made by the techniques' own functions."""
    from keras import ops

    from collabopt.clustering import init_centroids
    from collabopt.pruning import magnitude_mask
    from collabopt.quantization import WeightFakeQuant

    def numpy(x):
        return np.asarray(ops.convert_to_numpy(x), dtype=w.dtype)

    keys = iter(settings)
    for s in sparsities:
        yield next(keys), w * numpy(magnitude_mask(ops.convert_to_tensor(w), s))
    distinct = np.unique(w).size
    sample = w.ravel()[::max(1, w.size >> 20)]  # exact k-means on at most 2**20 values
    for k in clusters:
        if distinct <= k:  # already on at most k values
            yield next(keys), w
            continue
        centroids = init_centroids(sample, k, "kmeans1d")
        yield next(keys), centroids[np.searchsorted((centroids[1:] + centroids[:-1]) / 2,
                                                    w)].astype(w.dtype)
    if int8:  # the rounding QAT applies, per channel where QAT's is
        quantizer = WeightFakeQuant(per_channel=spec.int8_per_channel,
                                    channel_axes=spec.channel_axes,
                                    reduction_axes=spec.reduction_axes)
        yield next(keys), numpy(quantizer.apply(ops.convert_to_tensor(w)))


__all__ = ["Metric", "LayerSensitivity", "Sensitivity", "sensitivity"]
