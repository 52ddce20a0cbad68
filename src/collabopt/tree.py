"""The deployment tree of the reference guide, explored automatically.

Trained nodes (float fine-tunes and QAT) form a small DAG; every leaf is a fully-int8 TFLite
file. A parent is trained once and shared by its children, and each node's model and each
leaf's result are checkpointed in ``out_dir`` with atomic writes, so an interrupted run
continues where it stopped::

    base ── PTQ                      level 1
     ├── QAT                         level 1
     ├── prune ── PTQ                level 1
     │     ├── PQAT                  level 2
     │     └── cluster (zeros kept) ── PTQ   level 2
     │             └── PCQAT         level 3
     └── cluster ── PTQ              level 1
           └── CQAT                  level 2

With ``per_channel=True`` the clustered branches also run with per-channel codebooks, on the
kernels the int8 file scales per channel (conv, depthwise); Dense kernels, one scale in the
file, keep one codebook there (``co.cluster(per_channel="auto")``).
Pruning ramps up gradually on the model as given (batch norm still there to help it recover);
per-tensor clustering starts from a batch-norm-folded copy so its shared values are the ones
deployed; QAT and per-channel clustering keep batch norm training where the converter's fold
is exact (``batchnorm=``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Targets:
    """What a deployable leaf must meet; None means "no limit".

    ``max_metric_drop`` is in the tree's metric's own units, counted in its worse direction
    from the FP32 base (top-1: 0.01 = one point below; an error metric: 0.01 above);
    ``max_accuracy_drop`` is its older name and sets the same limit.
    """

    max_metric_drop: float | None = None
    max_zip_bytes: int | None = None
    max_latency_ms: float | None = None
    max_vela_cycles: int | None = None
    max_arena_bytes: int | None = None  # TFLite Micro tensor arena, measured (extra [micro])
    max_flash_bytes: int | None = None  # the model data in flash
    max_sram_bytes: int | None = None  # Ethos-U SRAM, from Vela (extra [vela])
    max_accuracy_drop: float | None = None

    def __post_init__(self):
        if self.max_accuracy_drop is not None:
            if self.max_metric_drop not in (None, self.max_accuracy_drop):
                raise ValueError("max_accuracy_drop and max_metric_drop set the same limit; "
                                 "give one of them")
            object.__setattr__(self, "max_metric_drop", self.max_accuracy_drop)

    def failures(self, row: dict, base_value: float, higher_is_better: bool = True
                 ) -> list[str]:
        """The targets ``row`` misses: "metric", "size", "latency", "vela cycles", ...; a leaf
        whose structure the file lost ("verified: no") meets none: it is not what it claims."""
        out = [] if row.get("verified", "yes") == "yes" else ["structure"]
        if self.max_metric_drop is not None:
            drop = (base_value - row["int8_metric"] if higher_is_better
                    else row["int8_metric"] - base_value)
            if drop > self.max_metric_drop + 1e-12:
                out.append("metric")
        if self.max_zip_bytes is not None and row["zip_bytes"] > self.max_zip_bytes:
            out.append("size")
        if self.max_latency_ms is not None and row["latency_ms"] > self.max_latency_ms:
            out.append("latency")
        for limit, key, what in ((self.max_vela_cycles, "vela_cycles", "vela cycles"),
                                 (self.max_arena_bytes, "arena_bytes", "arena"),
                                 (self.max_flash_bytes, "flash_bytes", "flash"),
                                 (self.max_sram_bytes, "vela_sram_bytes", "sram")):
            # unmeasured (tool missing, file does not run there) cannot meet a budget
            if limit is not None and (row.get(key) is None or row[key] > limit):
                out.append(what)
        return out


@dataclass(frozen=True)
class Node:
    """A trained model: ``op`` applied to ``parent`` and fine-tuned, at its settings (a
    prune node's sparsity, a cluster node's count; QAT nodes keep their parent's)."""

    name: str
    parent: str | None
    op: str  # "base", "prune", "cluster", "cluster_pc", "qat"
    sparsity: float | None = None
    clusters: int | None = None


@dataclass(frozen=True)
class Leaf:
    name: str
    node: str
    level: int
    quantization: str  # "ptq" or "qat"
    sparsity: float | None = None  # the settings on its path (None: not pruned / clustered)
    clusters: int | None = None
    mildness: int = 0  # 0 for the mildest settings; stop_when_met tries lower ranks first


def _plan(per_channel: bool, sparsities: Sequence[float] = (0.5,),
          clusters: Sequence[int] = (16,)) -> tuple[list[Node], list[Leaf]]:
    """Every node and leaf for the settings: one prune node per sparsity and one cluster
    node per count, shared by all their descendants. With one setting of each, names are
    the plain ones ("prune", "PCQAT"); with several, each carries its settings
    ("prune@0.75", "PCQAT 75% k8")."""
    sparsities = sorted(sparsities)  # mildest first
    clusters = sorted(clusters, reverse=True)
    many_s, many_k = len(sparsities) > 1, len(clusters) > 1

    def tag(s=None, k=None) -> tuple[str, str]:  # node suffix, leaf suffix
        node = (f"@{s:g}" if s is not None and many_s else "") + (
            f"@k{k}" if k is not None and many_k else "")
        label = ([f"{s:.0%}"] if s is not None and many_s else []) + (
            [f"k{k}"] if k is not None and many_k else [])
        return node, (" " + " ".join(label)) if label else ""

    def rank(s=None, k=None) -> int:
        return (sparsities.index(s) if s is not None else 0) + (
            clusters.index(k) if k is not None else 0)

    nodes = [Node("base", None, "base"), Node("qat", "base", "qat")]
    leaves = [Leaf("PTQ", "base", 1, "ptq"), Leaf("QAT", "qat", 1, "qat")]
    variants = [("", "cluster")] + ([("_pc", "cluster_pc")] if per_channel else [])
    for s in sparsities:
        n, label = tag(s)
        nodes += [Node(f"prune{n}", "base", "prune", s), Node(f"pqat{n}", f"prune{n}", "qat", s)]
        leaves += [Leaf(f"prune → PTQ{label}", f"prune{n}", 1, "ptq", s, None, rank(s)),
                   Leaf(f"PQAT{label}", f"pqat{n}", 2, "qat", s, None, rank(s))]
    for k in clusters:
        for pc, op in variants:
            n, label = tag(k=k)
            name = "(pc)" if pc else ""
            nodes += [Node(f"cluster{pc}{n}", "base", op, None, k),
                      Node(f"cqat{pc}{n}", f"cluster{pc}{n}", "qat", None, k)]
            leaves += [Leaf(f"cluster{name} → PTQ{label}", f"cluster{pc}{n}", 1, "ptq", None, k,
                            rank(k=k)),
                       Leaf(f"CQAT{name}{label}", f"cqat{pc}{n}", 2, "qat", None, k, rank(k=k))]
            for s in sparsities:
                n, label = tag(s, k)
                prune = f"prune{tag(s)[0]}"
                nodes += [Node(f"prune_cluster{pc}{n}", prune, op, s, k),
                          Node(f"pcqat{pc}{n}", f"prune_cluster{pc}{n}", "qat", s, k)]
                leaves += [Leaf(f"prune → cluster{name} → PTQ{label}", f"prune_cluster{pc}{n}",
                                2, "ptq", s, k, rank(s, k)),
                           Leaf(f"PCQAT{name}{label}", f"pcqat{pc}{n}", 3, "qat", s, k,
                                rank(s, k))]
    order = {name: i for i, name in enumerate(_LEAF_ORDER)}  # the guide's order in a level
    leaves.sort(key=lambda lf: (lf.level, lf.mildness, order[_kind(lf.name)]))
    # parents first; the per-tensor family before the per-channel one, as a parallel run
    # submits them (stable: settings stay mildest first)
    kinds = ["base", "prune", "cluster", "prune_cluster", "qat", "pqat", "cqat", "pcqat"]
    nodes.sort(key=lambda n: ("_pc" in n.name, kinds.index(n.name.split("@")[0]
                                                           .replace("_pc", ""))))
    return nodes, leaves


# a leaf's kind is its name without the settings; within one level and setting, this order
_LEAF_ORDER = ["PTQ", "QAT", "prune → PTQ", "cluster → PTQ", "PQAT", "prune → cluster → PTQ",
               "CQAT", "PCQAT", "cluster(pc) → PTQ", "CQAT(pc)", "prune → cluster(pc) → PTQ",
               "PCQAT(pc)"]


def _kind(leaf_name: str) -> str:
    return next(k for k in sorted(_LEAF_ORDER, key=len, reverse=True)
                if leaf_name == k or leaf_name.startswith(k + " "))


def leaf_names(per_channel: bool = True, sparsity=0.5, clusters=16) -> list[str]:
    """The leaves a tree with these settings builds, in exploration order."""
    return [leaf.name for leaf in _plan(per_channel, _as_settings(sparsity, "sparsity"),
                                        _as_settings(clusters, "clusters"))[1]]


def _as_settings(value, what: str) -> tuple:
    """One setting or a list of them, validated: sparsities in (0, 1), counts >= 3."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{what} must be one value or a list of distinct values, got {value!r}")
    for v in values:
        if what == "sparsity" and (isinstance(v, bool) or not isinstance(v, (int, float))
                                   or not 0 < v < 1):
            raise ValueError(f"sparsity must be in (0, 1), got {v!r}")
        if what == "clusters" and (isinstance(v, bool) or not isinstance(v, int) or v < 3):
            raise ValueError(f"clusters must be an int >= 3, got {v!r}")
    return tuple(values)


# --- data ---------------------------------------------------------------------------------
def _as_arrays(data, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) numpy arrays from a tuple, a tf.data.Dataset or a keras PyDataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        return (x, y) if limit is None else (x[:limit], _take(y, slice(limit)))
    xs, ys, n = [], [], 0
    iterator = data if not hasattr(data, "__getitem__") or hasattr(data, "take") else (
        data[i] for i in range(len(data)))
    for batch in iterator:
        bx, by = batch[0], batch[1]
        xs.append(np.asarray(bx))
        ys.append([np.asarray(v) for v in by] if isinstance(by, (tuple, list))
                  else np.asarray(by))  # one label array per output of a multi-output model
        n += len(xs[-1])
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError("the data set is empty")
    x = np.concatenate(xs)
    y = ([np.concatenate(parts) for parts in zip(*ys, strict=True)]
         if isinstance(ys[0], list) else np.concatenate(ys))
    return (x, y) if limit is None else (x[:limit], _take(y, slice(limit)))


def _take(y, index):
    """Labels at ``index``: one array, one per output of a multi-output model, or None
    (inputs alone, as calibration needs)."""
    if y is None:
        return None
    if isinstance(y, (tuple, list)):
        return type(y)(np.asarray(v)[index] for v in y)
    return np.asarray(y)[index]


def _sample(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples evenly spaced through array data, so data sorted by class still covers
    every class (tfmot's benchmarks sample the same way); the first ``n`` of a dataset,
    which is expected to be shuffled."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        picked = np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))
        return x[picked], _take(y, picked)
    return _as_arrays(data, limit=n)


def _calibration_inputs(data, n: int) -> np.ndarray:
    return _sample(data, n)[0]


def _fit_args(data) -> dict:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return {"x": data[0], "y": data[1]}
    return {"x": data}


# --- results ------------------------------------------------------------------------------
@dataclass
class ExploreResult:
    out_dir: Path
    rows: list[dict]
    baseline: dict
    recommended: str | None
    targets: Targets
    report_md: Path | None = None
    report_html: Path | None = None
    notes: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # leaves not built: path, node, error
    metric: str = "accuracy"  # the name of what *_metric columns hold
    higher_is_better: bool = True
    plan: list[dict] = field(default_factory=list)  # every planned leaf: path, level, parent
    spared: list[str] = field(default_factory=list)  # layer_policy="auto": what and why

    def table(self) -> list[dict]:
        """One row per leaf, the columns of the reference guide's table."""
        return [dict(r) for r in self.rows]

    def __str__(self) -> str:
        from collabopt.report import format_table

        return format_table(self.rows, self.baseline, self.metric)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


class ConfigMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class Sparing:
    """A layer selector less some layers by name: what ``layer_policy="auto"`` hands to
    ``co.prune`` / ``co.cluster`` (picklable, with a stable repr for the fingerprint)."""

    selector: object
    spared: tuple[str, ...]

    def __call__(self, layer) -> bool:
        from collabopt.core.rewrite import layer_matcher

        if layer.name in self.spared:
            return False
        match, _ = layer_matcher(self.selector)
        return match is None or bool(match(layer))


class DeploymentTree:
    """Explore the deployment tree for ``model`` on ``train``/``val`` data.

    ``compile`` is a function ``compile(model)`` or the keyword arguments of
    ``model.compile`` (an optimizer instance is cloned for each node); ``qat_compile``, the
    same for the QAT nodes (default: ``compile``). QAT only has to adapt a trained model to
    the int8 grid, and on a converged model a prune/cluster learning rate can move it further
    than the grid does (DS-CNN-L: 3e-4 lost 5 points on an unseen speaker, 1e-5 lost none).
    ``fit`` holds the keyword arguments of every fine-tuning ``model.fit`` (epochs,
    batch_size, callbacks...). ``prune_layers`` selects what the prune node prunes (names,
    classes or a predicate, as ``co.prune(layers=)``; default: every prunable layer) — e.g.
    leave depthwise kernels dense, as tfmot does, where 9 weights per channel leave little
    to remove. ``cluster_layers`` does the same for the cluster nodes (default: every
    clusterable layer, depthwise included; tfmot 0.8.1 leaves depthwise kernels unclustered).
    ``batchnorm="keep"`` (default) lets batch norm train in the QAT and per-channel cluster
    nodes wherever the converter folds it exactly (``co.quantize(batchnorm=)``); "fold"
    folds it first everywhere. Per-tensor cluster nodes always fold first, or the
    converter's per-channel rescale would break the shared codebook. PTQ calibrates on
    ``calibration_samples`` training inputs spread evenly through array data (the first ones
    of a dataset: shuffle it). ``seed`` reseeds every
    node's fine-tune (``keras.utils.set_random_seed``), so a leaf does not depend on which
    other paths were explored before it, and a resumed run trains the missing nodes exactly
    as an uninterrupted one; ``None`` leaves the random state to the caller (one stream
    consumed in exploration order). ``bias_correction`` (default) gives each layer of a
    batch-norm-folded cluster node back its pre-clustering channel means after the fine-tune
    (``co.correct_bias``): with batch norm folded nothing else re-estimates them (DS-CNN-L,
    50 %/16, three seeds: CQAT 92.0 → 93.6 %, docs/BENCHMARKS.md).

    ``metric`` scores every node and every file alike, on their outputs over ``val``
    (``collabopt.metrics.resolve``): top-1 by default, a Keras metric name or object, or a
    callable ``(y_true, y_pred) -> float``; ``higher_is_better`` defaults from the name
    where it is known (accuracy, auc: higher; mse, loss, error: lower). Rows hold it as
    ``fp32_metric`` / ``keras_metric`` / ``int8_metric``, ``Targets(max_metric_drop=)``
    limits it, and the report names it.

    ``sparsity`` and ``clusters`` take one value or a list: one prune node per sparsity and
    one cluster node per count, shared by every leaf below them, and the Pareto plots span
    them all; ``explore(stop_when_met=True)`` then goes level by level and, in a level, from
    the mildest settings (lowest sparsity, most clusters) on, and stops after the first
    group in which a leaf meets every target.

    ``layer_policy="auto"`` measures each layer alone at the tree's settings first
    (``co.sensitivity`` on training samples) and leaves the critical ones out of pruning /
    clustering at that setting: a layer whose drop exceeds both ``sensitivity_threshold``
    (default: the targets' ``max_metric_drop``) and twice the median layer's. The guide's
    "skip the critical layers", measured instead of guessed; the report lists them and why.

    ``distill=True`` (or a ``co.Distill(temperature, weight, kind)``) makes every fine-tune
    also match the uncompressed base's outputs (``co.distill``).
    """

    def __init__(self, model, train, val, compile: Callable | dict | None = None,
                 fit: dict | None = None, sparsity: float | Sequence[float] = 0.5,
                 clusters: int | Sequence[int] = 16,
                 per_channel: bool = False, targets: Targets | None = None,
                 calibration_samples: int = 300, latency_runs: int = 50,
                 vela_accelerator: str | None = "ethos-u55-128",
                 qat_compile: Callable | dict | None = None, prune_layers=None,
                 cluster_layers=None, batchnorm: str = "keep", seed: int | None = 0,
                 bias_correction: bool = True, metric=None,
                 higher_is_better: bool | None = None, layer_policy: str = "all",
                 sensitivity_threshold: float | None = None, distill=None):
        from collabopt.core.rewrite import ensure_built
        from collabopt.metrics import resolve
        from collabopt.quantization import BATCHNORM

        ensure_built(model)
        sparsities = _as_settings(sparsity, "sparsity")
        cluster_counts = _as_settings(clusters, "clusters")
        if batchnorm not in BATCHNORM:
            raise ValueError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.batchnorm, self.seed = batchnorm, seed
        self.metric = resolve(metric, higher_is_better)
        if layer_policy not in ("all", "auto"):
            raise ValueError(f"layer_policy must be 'all' or 'auto', got {layer_policy!r}")
        self.targets = targets or Targets()
        if layer_policy == "auto":
            sensitivity_threshold = (self.targets.max_metric_drop
                                     if sensitivity_threshold is None else sensitivity_threshold)
            if sensitivity_threshold is None:
                raise ValueError("layer_policy='auto' spares the layers whose metric drop "
                                 "alone is material: give Targets(max_metric_drop=...) or "
                                 "sensitivity_threshold=... (in the metric's units)")
        self.layer_policy, self.sensitivity_threshold = layer_policy, sensitivity_threshold
        from collabopt.distillation import Distill

        if distill is True:
            distill = Distill()
        if distill not in (None, False) and not isinstance(distill, Distill):
            raise TypeError("distill must be None/False (off), True (the defaults) or a "
                            f"co.Distill(temperature=, weight=, kind=), got {distill!r}")
        self.distill = distill or None
        self.spared: dict[str, list[str]] = {}  # "prune 50%" / "cluster 16" -> layer names
        self.bias_correction = bool(bias_correction)
        self.model = model
        self.train, self.val = train, val
        self.compile = compile or {"optimizer": "adam",
                                   "loss": "sparse_categorical_crossentropy",
                                   "metrics": ["accuracy"]}
        self.qat_compile = qat_compile or self.compile
        self.prune_layers, self.cluster_layers = prune_layers, cluster_layers
        self.fit = dict(fit or {"epochs": 1})
        self.sparsity, self.clusters, self.per_channel = sparsity, clusters, per_channel
        self.calibration_samples = calibration_samples
        self.latency_runs = latency_runs
        self.vela_accelerator = vela_accelerator
        self.nodes, self.leaves = _plan(per_channel, sparsities, cluster_counts)

    # -- configuration fingerprint (refuse to mix runs in one out_dir) --
    def fingerprint(self) -> dict:
        arch = json.dumps(self.model.get_config(), sort_keys=True, default=str)
        weights = hashlib.sha1()
        for w in self.model.get_weights():
            weights.update(np.ascontiguousarray(w).tobytes())
        fit = {k: v for k, v in self.fit.items() if k not in ("callbacks", "verbose")}
        return {"collabopt": _code_version(),
                "architecture": hashlib.sha1(arch.encode()).hexdigest(),
                "weights": weights.hexdigest(), "sparsity": self.sparsity,
                "clusters": self.clusters, "per_channel": self.per_channel,
                "fit": json.dumps(fit, sort_keys=True, default=str),
                "compile": _describe(self.compile), "qat_compile": _describe(self.qat_compile),
                "prune_layers": _describe_selector(self.prune_layers),
                "cluster_layers": _describe_selector(self.cluster_layers),
                "batchnorm": self.batchnorm, "seed": self.seed,
                "bias_correction": self.bias_correction,
                "metric": f"{self.metric.name} ("
                          f"{'higher' if self.metric.higher_is_better else 'lower'} is better)",
                "layer_policy": self.layer_policy,
                "sensitivity_threshold": self.sensitivity_threshold,
                "distill": repr(self.distill) if self.distill else "off"}

    def _compile(self, model, how):
        import keras

        if callable(how):
            how(model)
            return model
        kwargs = dict(how)
        opt = kwargs.get("optimizer", "adam")
        if isinstance(opt, keras.optimizers.Optimizer):
            kwargs["optimizer"] = opt.__class__.from_config(opt.get_config())
        model.compile(**kwargs)
        return model

    def _prune_schedule(self, sparsity: float):
        """Zhu & Gupta ramp over the first 2/3 of fine-tuning, then a third to recover.

        One-shot pruning of a deep model to a high sparsity (75 % of DS-CNN-L) destroyed it
        beyond what a short fine-tune recovers; the gradual ramp is what the reference uses.
        """
        from collabopt.pruning import PolynomialDecay

        per_epoch = self.fit.get("steps_per_epoch") or _steps_per_epoch(
            self.train, self.fit.get("batch_size", 32))
        steps = int(per_epoch) * int(self.fit.get("epochs", 1))
        end = max(1, (2 * steps) // 3)
        return PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end,
                               frequency=max(1, end // 16))

    def _train(self, node: Node, parent_model, log):
        import keras
        from keras import ops

        import collabopt as co
        from collabopt.batchnorm import batchnorm_is_stale, settle_batchnorm
        from collabopt.quantization import fold_batchnorm, fold_batchnorm_behind_per_tensor

        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)

        folded = None  # the uncompressed, batch-norm-folded parent of a cluster node
        if node.op == "prune":  # before BN folding: batch norm helps the model recover
            model = co.prune(parent_model, self._prune_schedule(node.sparsity),
                             layers=self._layers(self.prune_layers, f"prune {node.sparsity:.0%}"),
                             verbose=False)
        elif node.op == "cluster":
            # BN folded first, so the converter cannot rescale the shared values per channel
            folded = fold_batchnorm(parent_model)
            model = co.cluster(folded, node.clusters,
                               layers=self._layers(self.cluster_layers, f"cluster {node.clusters}"),
                               verbose=False)
        elif node.op == "cluster_pc":
            # per channel where the file scales per channel: those codebooks survive the
            # converter's BN fold, so there BN may keep training; Dense kernels (one scale)
            # get one codebook, as in the per-tensor node
            if self.batchnorm == "keep":  # batch norm re-estimates the means itself
                parent = fold_batchnorm_behind_per_tensor(parent_model)
            else:
                parent = folded = fold_batchnorm(parent_model)
            model = co.cluster(parent, node.clusters, per_channel="auto",
                               layers=self._layers(self.cluster_layers, f"cluster {node.clusters}"),
                               verbose=False)
        elif node.op == "qat":
            model = co.quantize(parent_model, batchnorm=self.batchnorm, verbose=False)
        else:
            raise AssertionError(node.op)
        if node.op in ("cluster", "cluster_pc"):  # pruned layers left unclustered stay pruned
            from collabopt.core.wrapper import OptimizedLayer
            from collabopt.pruning import keep_zeros

            model = keep_zeros(model, layers=lambda layer: not isinstance(layer, OptimizedLayer))
        trainer = model
        if self.distill is not None:  # the uncompressed base teaches every fine-tune
            d = self.distill
            trainer = co.distill(model, self.model, d.temperature, d.weight, d.kind)
        self._compile(trainer, self.qat_compile if node.op == "qat" else self.compile)
        trainer.fit(**_fit_args(self.train), **self.fit)
        _check_finite(model, node.name)
        steps = int(ops.convert_to_numpy(trainer.optimizer.iterations))
        if batchnorm_is_stale(model, steps):
            x = _calibration_inputs(self.train, 1000)
            batch = int(self.fit.get("batch_size") or 32)
            settle_batchnorm(model, (x[i:i + batch] for i in range(0, len(x), batch)))
            log(f"[tree] {node.name}: batch norm statistics re-estimated on {len(x):,} "
                f"training samples ({steps} steps left the moving averages behind)")
        if folded is not None and self.bias_correction:
            co.correct_bias(model, folded,
                            _calibration_inputs(self.train, self.calibration_samples))
        return model

    def _layers(self, selector, setting: str):
        """The user's selector, less the layers ``layer_policy="auto"`` spares at ``setting``."""
        spared = tuple(self.spared.get(setting, ()))
        return Sparing(selector, spared) if spared else selector

    def _spare_sensitive_layers(self, out: Path, log) -> list[str]:
        """``layer_policy="auto"``: measure every layer alone at the tree's settings
        (``co.sensitivity``, on training samples, no fine-tuning) and spare, per setting,
        the critical layers: those whose drop exceeds both the threshold and twice the median
        layer's drop there. Cached in ``out_dir``; returns the report's lines."""
        from collabopt.layer_sensitivity import sensitivity

        file = out / "sensitivity.json"
        if file.exists():
            cached = json.loads(file.read_text())
        else:
            sparsities = sorted({n.sparsity for n in self.nodes if n.op == "prune"})
            counts = sorted({n.clusters for n in self.nodes if n.clusters})
            log(f"[tree] layer_policy='auto': per-layer sensitivity at "
                f"{[f'{s:.0%}' for s in sparsities]} sparsity and {counts} clusters ...")
            sens = sensitivity(self.model, _sample(self.train, 1000), metric=self.metric,
                               sparsities=sparsities, clusters=counts, int8=False,
                               verbose=False)
            sens.plot(out / "sensitivity.png")
            cached = {"settings": sens.settings, "base": sens.base, "table": sens.table()}
            _atomic_json(file, cached)
        lines = []
        for setting in cached["settings"]:
            drops: dict[str, float] = {}
            for row in cached["table"]:  # a layer is as sensitive as its worst weight
                drops[row["layer"]] = max(drops.get(row["layer"], -np.inf), row[setting])
            median = float(np.median(list(drops.values())))
            bar = max(self.sensitivity_threshold, 2 * median)
            spared = sorted(name for name, drop in drops.items() if drop > bar)
            self.spared[setting] = spared
            if spared:
                lines.append(f"{setting}: {', '.join(spared)} spared (alone, no fine-tune: "
                             + ", ".join(f"{drops[n]:+.4g}" for n in spared)
                             + f" {self.metric.name} drop; the bar: {bar:.4g} = max(threshold "
                             f"{self.sensitivity_threshold:g}, twice the median {median:.4g}))")
            else:
                lines.append(f"{setting}: no layer spared (largest drop {max(drops.values()):+.4g}"
                             f", the bar {bar:.4g})")
        for line in lines:
            log(f"[tree] {line}")
        return lines

    def _train_and_store(self, node: Node, parent_model, out: Path, log):
        """Train ``node`` and checkpoint it atomically: a QAT model as it is, others stripped."""
        import collabopt as co

        model = self._train(node, parent_model, log)
        stored = model if node.op == "qat" else co.strip(model)
        _atomic_save(stored, out / "nodes" / f"{node.name}.keras")
        return stored

    # -- exploring --
    def search(self, out_dir: str | os.PathLike, config=None, force: bool = False,
               log: Callable[[str], None] = print):
        """Search one path's settings, per layer included, for the best trade-offs of the
        metric against zipped bytes (``co.Search``: Optuna, trials resumable in ``out_dir``).
        The tree's own ``sparsity`` / ``clusters`` do not apply there: the search's ranges
        do; everything else (training, targets, distillation, verification) is the tree's."""
        from collabopt.search import search

        return search(self, out_dir, config, force=force, log=log)

    def explore(self, out_dir: str | os.PathLike, paths: str | Sequence[str] = "all",
                stop_when_met: bool = False, force: bool = False,
                log: Callable[[str], None] = print, executor=None) -> ExploreResult:
        """Train the nodes the chosen ``paths`` need, export and measure every leaf.

        ``executor`` (a ``concurrent.futures.Executor``: ``ProcessPoolExecutor``, a Dask
        client's ``get_executor()``, Ray's) trains every node whose parent is done as a
        task of its own (``collabopt.parallel``): ``out_dir`` must be on a file system every
        worker sees. A node that fails there fails its leaves alone, listed in
        ``result.failed``; the run goes on, and a re-run trains only what is missing.
        Leaves are always built here, one after another, so latencies are not measured on
        a loaded machine.
        """
        import keras

        import collabopt as co
        from collabopt import parallel
        from collabopt.inspection import inspect, latency_ms, predict_tflite, verify

        out = Path(out_dir)
        wanted = self._select(paths)
        fingerprint = self.fingerprint()
        config_file = out / "config.json"
        if config_file.exists():
            previous = json.loads(config_file.read_text())
            if previous != fingerprint:
                if not force:
                    diff = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
                    raise ConfigMismatch(
                        f"{out} holds a run with a different configuration ({', '.join(diff)} "
                        "differ). Use another out_dir, or force=True (--force) to start over.")
                shutil.rmtree(out)
        (out / "nodes").mkdir(parents=True, exist_ok=True)
        (out / "leaves").mkdir(parents=True, exist_ok=True)
        for partial in out.rglob("*.partial*"):  # left by a process killed mid-write
            partial.unlink()
        _atomic_json(config_file, fingerprint)
        node_failures: dict[str, str] = {}
        spared_lines = (self._spare_sensitive_layers(out, log)
                        if self.layer_policy == "auto" else [])
        if executor is not None:  # before any work: what cannot reach a worker fails now
            parallel.prepare_run(self, out)

        def train_in_parallel(leaves) -> None:
            names = [n for n in parallel.needed_nodes(self, {leaf.node for leaf in leaves})
                     if n not in node_failures]  # a failed node is retried by a re-run only
            node_failures.update(parallel.train_nodes(self, out, names, executor, log))

        x_val, y_val = _as_arrays(self.val)
        x_cal = _calibration_inputs(self.train, self.calibration_samples)
        trained: dict[str, object] = {}
        from collabopt import micro, vela

        use_vela = self.vela_accelerator is not None and vela.available()
        use_tflm = micro.available()

        def node_model(name: str):
            if name in trained:
                return trained[name]
            node = next(n for n in self.nodes if n.name == name)
            file = out / "nodes" / f"{name}.keras"
            if node.op == "base":
                model = self.model
            elif file.exists():
                model = keras.models.load_model(file, safe_mode=True)
                log(f"[tree] {name}: loaded from {file}")
            elif name in node_failures:  # failed once in this run: not again for each leaf
                raise parallel.NodeFailed(name, node_failures[name])
            else:
                try:
                    parent = node_model(node.parent)
                except parallel.NodeFailed as err:
                    node_failures[name] = f"its parent {err.node} failed"
                    raise
                start = time.perf_counter()
                log(f"[tree] {name}: {node.op} of {node.parent}, fine-tuning ...")
                try:
                    model = self._train_and_store(node, parent, out, log)
                except Exception as err:
                    node_failures[name] = f"{type(err).__name__}: {err}"
                    raise parallel.NodeFailed(name, node_failures[name]) from err
                log(f"[tree] {name}: trained in {time.perf_counter() - start:.1f}s")
            trained[name] = model
            return model

        def float_metric(name: str) -> float:
            file = out / "nodes" / f"{name}.metric.json"
            if file.exists():
                return json.loads(file.read_text())["value"]
            value = self.metric.score(
                y_val, node_model(name).predict(x_val, verbose=0, batch_size=256))
            _atomic_json(file, {"metric": self.metric.name, "value": value})
            return value

        def build_leaf(leaf: Leaf, level: int, result_file: Path) -> dict:
            start = time.perf_counter()
            model = node_model(leaf.node)
            path = out / "leaves" / f"{_slug(leaf.name)}.tflite"
            per_tensor = leaf.quantization == "ptq" and "pc" not in leaf.node and \
                "cluster" in leaf.node
            # QAT leaves: None lets the export keep a per-tensor codebook where calibration
            # has to fill in ranges (a model without a graph), as the fake-quant did
            co.export_tflite(model, path, representative_data=x_cal,
                             per_channel_weights=False if per_tensor else None)
            rep = inspect(path)
            file_out = predict_tflite(path, x_val, verbose=False)
            keras_out = model.predict(x_val, verbose=0, batch_size=256)
            try:
                verify(path, model)
                verified = "yes"
            except co.VerificationError as err:
                lines = str(err).splitlines()  # the first failed check, else the message
                verified = "no: " + (lines[1] if len(lines) > 1 else lines[0]).strip()
            pruned_by = _prune_ancestor(self.nodes, leaf.node)
            if verified == "yes" and pruned_by not in (None, leaf.node):
                # verify holds the exported model's zeros in the file; this, the prune
                # node's zeros in the exported model (what a later fine-tune could refill)
                lost = _zeros_lost(node_model(pruned_by), model)
                if lost:
                    verified = (f"no: {lost[0]} of node {pruned_by}'s zeros were refilled "
                                "before export")
            row = {
                "path": leaf.name, "level": level, "node": leaf.node,
                "target_sparsity": leaf.sparsity, "target_clusters": leaf.clusters,
                **self._metric_columns(
                    fp32=float_metric(leaf.node if leaf.quantization == "ptq"
                                      else _float_parent(self.nodes, leaf.node)),
                    keras=float_metric(leaf.node),  # the exported model
                    int8=self.metric.score(y_val, file_out)),
                # conversion fidelity, finer than a metric difference (flips in both
                # directions cancel there); classes only where outputs are class scores
                "agreement": _agreement(file_out, keras_out),
                "output_error": _relative_error(file_out, keras_out),
                "size_bytes": rep.size_bytes, "zip_bytes": rep.zip_bytes,
                "zip_reduction": 1 - rep.zip_bytes / baseline["zip_bytes"],
                "sparsity": rep.sparsity,
                "unique_max": max((t.unique for t in rep.tensors), default=0),
                "unique_per_channel_max": max(
                    (t.unique_per_channel_max for t in rep.tensors), default=0),
                "entropy_bound_bytes": rep.entropy_bound_bytes,
                "latency_ms": latency_ms(path, runs=self.latency_runs),
                "latency_threads": 1,
                "vela_encoded_bytes": None, "vela_cycles": None, "vela_sram_bytes": None,
                "flash_bytes": rep.size_bytes, "arena_bytes": None, "tflm": None,
                "verified": verified, "file": str(path),
            }
            if use_tflm:
                tflm = micro.tflm_report(path)
                row["arena_bytes"], row["tflm_line"] = tflm.arena_bytes, tflm.summary
                row["tflm"] = "yes" if tflm.runs else "no ({})".format(", ".join(
                    u["op"] for u in tflm.unsupported) or tflm.error)
            if use_vela:
                try:
                    v = co.vela_report(path, self.vela_accelerator)
                    row["vela_encoded_bytes"] = v.encoded_weight_bytes
                    row["vela_cycles"] = v.cycles
                    row["vela_sram_bytes"] = v.sram_bytes
                except RuntimeError as err:
                    row["vela_error"] = str(err)
            row["seconds"] = time.perf_counter() - start  # export and measurements
            _atomic_json(result_file, row)
            same = ("" if row["agreement"] is None
                    else f" (same class as Keras on {row['agreement']:.2%})")
            log(f"[tree] level {level} · {leaf.name}: int8 {self.metric.name} "
                f"{row['int8_metric']:.4f}{same}, {row['zip_bytes']:,} bytes zipped, "
                f"{row['latency_ms']:.3f} ms, verified {verified} "
                f"({time.perf_counter() - start:.1f}s)")
            return row

        # the FP32 reference row
        base_file = out / "leaves" / "fp32.tflite"
        baseline_json = out / "leaves" / "fp32.json"
        if baseline_json.exists():
            baseline = json.loads(baseline_json.read_text())
        else:
            co.export_tflite(node_model("base"), base_file, quantization="float")
            rep = inspect(base_file)
            baseline = {"path": "FP32 baseline",
                        **self._metric_columns(fp32=float_metric("base"), keras=None,
                                               int8=None),
                        "size_bytes": rep.size_bytes,
                        "zip_bytes": rep.zip_bytes,
                        "latency_ms": latency_ms(base_file, runs=self.latency_runs)}
            _atomic_json(baseline_json, baseline)
        log(f"[tree] FP32 baseline: {self.metric.name} {baseline['fp32_metric']:.4f}, "
            f"{baseline['zip_bytes']:,} bytes zipped")

        rows: list[dict] = []
        failed: list[dict] = []
        if executor is not None and not stop_when_met:
            train_in_parallel([lf for lf in self.leaves if lf.name in wanted])
        # stop_when_met: level by level, and in a level the mildest settings first
        groups = sorted({(lf.level, lf.mildness) for lf in self.leaves if lf.name in wanted})
        for level, mildness in groups:
            level_rows = []
            level_leaves = [lf for lf in self.leaves if lf.name in wanted
                            and (lf.level, lf.mildness) == (level, mildness)]
            if executor is not None and stop_when_met:
                train_in_parallel(level_leaves)
            for leaf in level_leaves:
                slug = _slug(leaf.name)
                result_file = out / "leaves" / f"{slug}.json"
                if leaf.node in node_failures:
                    failed.append({"path": leaf.name, "level": level, "node": leaf.node,
                                   "error": f"node {leaf.node}: {node_failures[leaf.node]}"})
                    continue
                if result_file.exists():
                    row = json.loads(result_file.read_text())
                    log(f"[tree] level {level} · {leaf.name}: done earlier "
                        f"(int8 {self.metric.name} {row['int8_metric']:.4f})")
                else:
                    try:
                        row = build_leaf(leaf, level, result_file)
                    except Exception as err:  # noqa: BLE001 - one leaf's failure ends no run
                        reason = (f"node {err.node}: {err.reason}"
                                  if isinstance(err, parallel.NodeFailed)
                                  else f"{type(err).__name__}: {err}".strip())
                        failed.append({"path": leaf.name, "level": level, "node": leaf.node,
                                       "error": reason, "traceback": traceback.format_exc()})
                        log(f"[tree] level {level} · {leaf.name}: FAILED, {reason}")
                        continue
                row["meets_targets"] = not self.targets.failures(
                    row, baseline["fp32_metric"], self.metric.higher_is_better)
                level_rows.append(row)
            rows.extend(level_rows)
            if stop_when_met and any(r["meets_targets"] for r in level_rows):
                where = f"level {level}" + (f", settings rank {mildness}" if mildness else "")
                log(f"[tree] {where} meets the targets: stopping here, as the guide "
                    "recommends")
                break
        recommended = _recommend(rows, self.metric.higher_is_better)
        result = ExploreResult(out, rows, baseline, recommended, self.targets, failed=failed,
                               metric=self.metric.name,
                               higher_is_better=self.metric.higher_is_better,
                               plan=self._leaf_tree(), spared=spared_lines)
        if failed:
            log(f"[tree] {len(failed)} leaf/leaves failed ({', '.join(f['path'] for f in failed)})"
                "; the report says why, and running the same exploration again retries them")
        from collabopt.report import write_report

        for name in self._density_nodes().values():  # stages of the density plot
            if name == "base" or (out / "nodes" / f"{name}.keras").exists():
                node_model(name)
        write_report(result, density_sources=self._density_sources(trained, out))
        return result

    def _metric_columns(self, fp32, keras, int8) -> dict:
        """The metric's columns; for top-1 also under their historical ``*_accuracy`` names,
        which the benchmarks' stored tables use."""
        cols = {"fp32_metric": fp32, "keras_metric": keras, "int8_metric": int8}
        if self.metric.name == "accuracy":
            cols.update({k.replace("_metric", "_accuracy"): v for k, v in cols.items()})
        return cols

    def _select(self, paths) -> set[str]:
        names = [leaf.name for leaf in self.leaves]
        if paths == "all":
            return set(names)
        if isinstance(paths, str):
            paths = [paths]
        unknown = [p for p in paths if p not in names]
        if unknown:
            raise ValueError(f"unknown tree path(s) {unknown}; choose from {names}")
        return set(paths)

    def _leaf_tree(self) -> list[dict]:
        """Each leaf with the leaf it descends from (None: the FP32 base), for the picture."""
        parent_node = {n.name: n.parent for n in self.nodes}
        leaf_of = {lf.node: lf.name for lf in self.leaves}
        return [{"path": lf.name, "level": lf.level,
                 "parent": None if lf.node == "base" or parent_node[lf.node] == "base"
                 else leaf_of[parent_node[lf.node]]} for lf in self.leaves]

    def _density_sources(self, trained, out: Path) -> dict:
        """Stages for the density plot of one representative kernel."""
        stages = {}
        nodes = self._density_nodes()
        for label, node in nodes.items():
            if node in trained:
                stages[label] = trained[node]
        pcqat = next(lf.name for lf in self.leaves if lf.quantization == "qat" and next(
            n.parent for n in self.nodes if n.name == lf.node) == nodes["pruned + clustered"])
        file = out / "leaves" / f"{_slug(pcqat)}.tflite"
        if file.exists():
            stages["PCQAT int8 (file)"] = str(file)
        return stages

    def _density_nodes(self) -> dict[str, str]:
        """The nodes the density plot follows: the first (mildest) prune -> cluster path."""
        prune_cluster = next(n for n in self.nodes if n.op == "cluster" and n.sparsity)
        return {"baseline": "base", "pruned": prune_cluster.parent,
                "pruned + clustered": prune_cluster.name}


def _describe(compile_spec) -> str:
    """A stable text for the fingerprint; a function is known by its name and its closure."""
    def plain(obj):  # Keras objects by their config without the auto-numbered name
        if hasattr(obj, "get_config"):
            return {k: v for k, v in obj.get_config().items() if k != "name"}
        return type(obj).__name__  # never a repr with a memory address

    if isinstance(compile_spec, dict):
        return json.dumps(compile_spec, sort_keys=True, default=plain)
    cells = [c.cell_contents for c in getattr(compile_spec, "__closure__", None) or ()]
    values = [v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
              for v in cells]  # no reprs with memory addresses: a rerun must match
    return f"{getattr(compile_spec, '__qualname__', 'callable')}{values!r}"


def _describe_selector(selector) -> str:
    if selector is None:
        return "all"
    if dataclasses.is_dataclass(selector):  # AllExcept: its repr says everything
        return repr(selector)
    if callable(selector) and not isinstance(selector, type):
        return _describe(selector)
    items = selector if isinstance(selector, (list, tuple, set)) else [selector]
    return json.dumps(sorted(getattr(i, "__name__", str(i)) for i in items))


def _code_version() -> str:
    """Version plus a hash of the package's sources: nodes trained by other code are stale."""
    import collabopt

    digest = hashlib.sha1()
    root = Path(collabopt.__file__).parent
    for file in sorted(root.rglob("*.py")):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return f"{collabopt.__version__}+{digest.hexdigest()[:12]}"


def _steps_per_epoch(data, batch_size: int) -> int:
    """Training steps in one epoch of ``fit`` for numpy tuples, tf.data or a PyDataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return max(1, -(-len(data[0]) // int(batch_size)))
    if hasattr(data, "cardinality"):  # tf.data: len() raises when the count is unknown
        n = int(data.cardinality())
        return n if n > 0 else max(1, sum(1 for _ in data))
    if hasattr(data, "__len__"):
        return max(1, len(data))
    return max(1, sum(1 for _ in data))


def _float_parent(nodes: list[Node], name: str) -> str:
    node = next(n for n in nodes if n.name == name)
    return node.parent if node.op == "qat" else name


def _prune_ancestor(nodes: list[Node], name: str) -> str | None:
    """The prune node on the path to node ``name`` (itself included), if any."""
    by_name = {n.name: n for n in nodes}
    while name is not None:
        if by_name[name].op == "prune":
            return name
        name = by_name[name].parent
    return None


def _zeros_lost(pruned, model) -> list[str]:
    """Per pruned weight of ``pruned`` (sparse by ``structure``'s measure, so a stray zero of
    an unpruned weight does not count): how many of its zeros ``model`` no longer holds."""
    from collabopt.core import registry, structure
    from collabopt.core.rewrite import is_wrapped, iter_layers, strip

    plain = strip(model) if is_wrapped(model) else model
    ours = {layer.name: layer for layer in iter_layers(plain)}
    lost = []
    for layer in iter_layers(pruned):
        if layer.name not in ours:
            continue
        for spec in registry.weight_specs(layer) or ():
            w = registry.find_variable(layer, spec.name).numpy()
            if not structure.detect(w, spec.channel_axes).sparse:
                continue
            before = w == 0
            try:
                after = registry.find_variable(ours[layer.name], spec.name).numpy()
            except (KeyError, ValueError):
                continue
            if after.shape == before.shape and (n := int(np.count_nonzero(before & (after != 0)))):
                lost.append(f"{layer.name}.{spec.name}: {n:,} of {int(before.sum()):,}")
    return lost


def _classes(outputs) -> np.ndarray:
    outputs = np.asarray(outputs)
    return np.argmax(outputs.reshape(len(outputs), -1), axis=1)


def _outputs(out) -> list[np.ndarray]:
    return [np.asarray(o) for o in out] if isinstance(out, (list, tuple)) else [np.asarray(out)]


def _check_finite(model, node: str) -> None:
    """Fail a node whose fine-tune diverged: NaN weights convert to a file the converter
    rejects with an unrelated message (a bias-scale check), or to one that computes NaN."""
    import keras

    bad = [v.path for v in model.weights
           if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))]
    if bad:
        raise FloatingPointError(
            f"node {node!r}: fine-tuning diverged, {len(bad)} weights are NaN or infinite "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). Lower the learning "
            "rate (the tree's compile= / qat_compile=) or clip gradients (clipnorm=1.0), "
            "then run the exploration again: finished nodes are kept.")


def _agreement(file_out, keras_out) -> float | None:
    """Share of samples whose top class is the same in the file and in Keras (averaged over
    the outputs with more than one value per sample); None where no output has (a
    regressor: its fidelity is ``output_error``)."""
    pairs = [(f, k) for f, k in zip(_outputs(file_out), _outputs(keras_out), strict=True)
             if k.reshape(len(k), -1).shape[1] >= 2]
    if not pairs:
        return None
    return float(np.mean([np.mean(_classes(f) == _classes(k)) for f, k in pairs]))


def _relative_error(file_out, keras_out) -> float:
    """The file's largest output deviation from Keras, relative to the largest Keras output
    (0.01: within 1 % of the output range; meaningful where classes are not)."""
    return max(float(np.abs(f.astype("float64") - k).max()
                     / max(np.abs(k.astype("float64")).max(), 1e-12))
               for f, k in zip(_outputs(file_out), _outputs(keras_out), strict=True))


def _slug(name: str) -> str:
    """A leaf's file name: "prune → cluster(pc) → PTQ 75% k8" -> prune-cluster_pc-ptq_75pct_k8."""
    name = name.replace(" → ", "-").replace("(pc)", "_pc").replace("%", "pct")
    return re.sub(r"[^a-z0-9_.-]+", "_", name.lower())


def _recommend(rows: list[dict], higher_is_better: bool = True) -> str | None:
    """The smallest file meeting every target; among equal sizes, the best metric."""
    meeting = [r for r in rows if r["meets_targets"]]
    if not meeting:
        return None
    sign = -1 if higher_is_better else 1
    best = min(meeting, key=lambda r: (r["zip_bytes"], sign * r["int8_metric"]))
    return best["path"]


__all__ = ["DeploymentTree", "Targets", "ExploreResult", "leaf_names"]
