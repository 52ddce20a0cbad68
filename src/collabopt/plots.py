"""Pictures: a kernel's weight density through the pipeline stages, and the accuracy/size
trade-off with its Pareto front. PNG files, drawn headless (Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kernel_values(source, layer: str) -> np.ndarray:
    """Float values of ``layer``'s kernel from a Keras model or a ``.tflite`` path."""
    if isinstance(source, (str, os.PathLike)):
        from collabopt.inspection import _dequantize, inspect

        report = inspect(source)
        matches = [t for t in report.tensors if t.layer == layer]
        if not matches:
            raise KeyError(f"{source} has no weight tensor of layer {layer!r}; it has "
                           f"{sorted({t.layer for t in report.tensors})}")
        return _dequantize(matches[0]).ravel()
    from collabopt.core import registry
    from collabopt.core.rewrite import is_wrapped, iter_layers, strip

    model = strip(source) if is_wrapped(source) else source
    for candidate in iter_layers(model):
        if candidate.name == layer:
            specs = registry.weight_specs(candidate)
            if specs:
                return registry.find_variable(candidate, specs[-1].name).numpy().ravel()
    raise KeyError(f"model has no optimizable layer named {layer!r}")


def plot_weight_density(models_or_paths: Mapping[str, object] | Sequence[object], layer: str,
                        out: str | os.PathLike, bins: int = 200) -> Path:
    """Histogram of one kernel's values at each stage (baseline, pruned, clustered,
    quantized...), one panel per stage, as in the reference guide. Returns the PNG path."""
    items = (list(models_or_paths.items()) if isinstance(models_or_paths, Mapping)
             else [(str(i), m) for i, m in enumerate(models_or_paths)])
    if not items:
        raise ValueError("plot_weight_density needs at least one model or .tflite path")
    plt = _plt()
    fig, axes = plt.subplots(len(items), 1, figsize=(7, 1.9 * len(items)), sharex=True,
                             squeeze=False)
    for ax, (label, source) in zip(axes[:, 0], items, strict=True):
        v = _kernel_values(source, layer)
        unique = np.unique(v).size
        ax.hist(v, bins=bins, color="#3366aa", log=True)
        ax.set_ylabel("count")
        ax.set_title(f"{label}: {unique} unique, {np.mean(v == 0):.0%} zeros", fontsize=9,
                     loc="left")
    axes[-1, 0].set_xlabel(f"weight value ({layer})")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (smaller x and larger y are better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_tradeoff(results: Sequence[Mapping], out: str | os.PathLike,
                  x: str = "zip_bytes", y: str = "int8_accuracy",
                  label: str = "path") -> Path:
    """Scatter of ``y`` (accuracy) against ``x`` (zipped bytes, or ``vela_cycles``) for each
    result row, Pareto front drawn and labelled. Rows lacking ``x`` are left out."""
    rows = [r for r in results if r.get(x) is not None and r.get(y) is not None]
    if not rows:
        raise ValueError(f"no result has both {x!r} and {y!r}")
    plt = _plt()
    pts = [(float(r[x]), float(r[y])) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(*zip(*pts, strict=True), color="#999999", zorder=2)
    fx, fy = zip(*[pts[i] for i in front], strict=True)
    ax.plot(fx, fy, "-o", color="#cc3311", zorder=3, label="Pareto front")
    for r, (px, py) in zip(rows, pts, strict=True):
        ax.annotate(str(r.get(label, "")), (px, py), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
