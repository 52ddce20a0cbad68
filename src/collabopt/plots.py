"""Pictures: a kernel's weight density through the pipeline stages, and the accuracy/size
trade-off with its Pareto front, the explored deployment tree. PNG files, drawn headless
(Agg)."""

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


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True
                 ) -> list[int]:
    """Indices of points not dominated (smaller x and larger y are better; with
    ``higher_is_better=False`` smaller y is)."""
    if not higher_is_better:
        front = pareto_front([(x, -y) for x, y in points])
        return front
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_tradeoff(results: Sequence[Mapping], out: str | os.PathLike,
                  x: str = "zip_bytes", y: str = "int8_accuracy",
                  label: str = "path", y_label: str | None = None,
                  higher_is_better: bool = True) -> Path:
    """Scatter of ``y`` (accuracy, or the tree's metric) against ``x`` (zipped bytes, or
    ``vela_cycles``) for each result row, Pareto front drawn and labelled. Rows lacking
    ``x`` are left out."""
    rows = [r for r in results if r.get(x) is not None and r.get(y) is not None]
    if not rows:
        raise ValueError(f"no result has both {x!r} and {y!r}")
    plt = _plt()
    pts = [(float(r[x]), float(r[y])) for r in rows]
    front = pareto_front(pts, higher_is_better)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(*zip(*pts, strict=True), color="#999999", zorder=2)
    fx, fy = zip(*[pts[i] for i in front], strict=True)
    ax.plot(fx, fy, "-o", color="#cc3311", zorder=3, label="Pareto front")
    for r, (px, py) in zip(rows, pts, strict=True):
        ax.annotate(str(r.get(label, "")), (px, py), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y_label or y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_tree(leaves: Sequence[Mapping], baseline: Mapping, out: str | os.PathLike,
              metric: str = "accuracy", recommended: str | None = None) -> Path:
    """The explored deployment tree, drawn as the reference guide draws it: the FP32 base at
    the root, each leaf one box at its level below the leaf it was fine-tuned from, with its
    int8 metric and zipped size; green: meets every target, bold border: the recommended
    leaf, grey: planned but not built (stopped early, failed or not asked for).

    ``leaves``: one mapping per planned leaf with ``path``, ``level``, ``parent`` (the
    ``path`` of the leaf above it, None under the root) and, where it was built, its ``row``.
    """
    plt = _plt()
    children: dict[str | None, list[Mapping]] = {}
    for leaf in leaves:
        children.setdefault(leaf.get("parent"), []).append(leaf)
    y_of: dict[str | None, float] = {}
    next_y = [0.0]

    def place(key):  # tidy layout: leaves of the drawing take rows, parents their mean
        kids = children.get(key, [])
        for kid in kids:
            place(kid["path"])
        if kids:
            y_of[key] = float(np.mean([y_of[k["path"]] for k in kids]))
        else:
            y_of[key] = next_y[0]
            next_y[0] += 1

    place(None)
    rows = max(next_y[0], 1)
    fig, ax = plt.subplots(figsize=(13, 1.0 + 0.62 * rows))
    depth = {None: 0}
    for leaf in leaves:
        depth[leaf["path"]] = leaf["level"]

    def box(key, text, colour, bold):
        ax.annotate(text, (depth[key], -y_of[key]), ha="center", va="center", fontsize=7,
                    bbox={"boxstyle": "round,pad=0.3", "fc": colour,
                          "ec": "black" if bold else "#888888", "lw": 2.2 if bold else 0.8})

    for leaf in leaves:
        parent = leaf.get("parent")
        ax.plot([depth[parent], depth[leaf["path"]]], [-y_of[parent], -y_of[leaf["path"]]],
                color="#bbbbbb", lw=0.8, zorder=0)
    base_value = baseline.get("fp32_metric")
    box(None, f"FP32 base\n{metric} {base_value:.4g}\n{baseline['zip_bytes'] / 1024:.1f} KB zip"
        if base_value is not None else "FP32 base", "#ffffff", False)
    for leaf in leaves:
        row = leaf.get("row")
        if row is None:
            box(leaf["path"], f"{leaf['path']}\n(not built)", "#eeeeee", False)
            continue
        colour = "#c8e6c9" if row.get("meets_targets") else "#fff3e0"
        box(leaf["path"], f"{leaf['path']}\n{metric} {row['int8_metric']:.4g}\n"
            f"{row['zip_bytes'] / 1024:.1f} KB zip", colour, leaf["path"] == recommended)
    levels = max(depth.values())
    ax.set_xlim(-0.5, levels + 0.5)
    ax.set_ylim(-rows + 0.4, 0.6)
    ax.set_xticks(range(levels + 1), ["base"] + [f"level {i}" for i in range(1, levels + 1)])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title("Deployment tree explored (green: meets every target; bold: recommended)",
                 fontsize=9, loc="left")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
