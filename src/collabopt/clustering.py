"""Weight clustering (Deep Compression, ch. 3): weights share k trainable centroids.

Each forward pass assigns every weight to its nearest centroid by a sorted-boundary search
(1-D ``searchsorted`` per tensor, k-1 comparisons per channel), so memory stays linear in the
weight count. The assignment follows the float weights during fine-tuning through a
straight-through gradient, and the centroids train too. With sparsity preserved the zeros are
masked out of the assignment and pinned at exactly 0, leaving k-1 free centroids; 0 stays one
of the k values a surviving weight may take (as in tfmot), so a survivor near the pruning
threshold can join the zeros instead of being forced onto a far centroid. With only k-1 values
for the survivors, the MNIST CNN at 75 % sparsity and 4 clusters lost 0.45-0.6 points to
tfmot; with 0 among them, 0.03-0.05 (three seeds, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from collabopt.batchnorm import _bn_pairs, _fold_where, holds_batchnorm
from collabopt.core import registry, structure
from collabopt.core.rewrite import (
    LayerSelector,
    apply_to_model,
    current_weight,
    host_layer,
    iter_layers,
    layer_matcher,
)
from collabopt.core.transform import Transform
from collabopt.core.wrapper import OptimizedLayer

INITS = ("kmeans++", "linear", "density", "random", "kmeans1d")


def init_centroids(values: np.ndarray, k: int, init: str, seed: int = 0) -> np.ndarray:
    """k ascending centroids for the 1-D ``values`` by the named method."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    rng = np.random.default_rng(seed)
    if init == "linear":
        return np.linspace(lo, hi, k)
    if init == "random":
        return np.sort(rng.uniform(lo, hi, k))
    if init == "density":  # equal-mass bins of the empirical CDF
        return np.quantile(v, (np.arange(k) + 0.5) / k)
    if init == "kmeans1d":
        from collabopt._kernels.kmeans1d import kmeans1d

        return kmeans1d(v, k)
    if init == "kmeans++":  # seeds and Lloyd refinement on a sample: it is an initialiser
        sample = v if v.size <= 200_000 else rng.choice(v, 200_000, replace=False)
        return _lloyd(sample, _kmeanspp_seeds(sample, k, rng))
    raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")


def _kmeanspp_seeds(v, k, rng):
    sample = v if v.size <= 20000 else rng.choice(v, 20000, replace=False)
    seeds = [sample[rng.integers(sample.size)]]
    d2 = (sample - seeds[0]) ** 2
    for _ in range(k - 1):
        total = d2.sum()
        pick = rng.choice(sample.size, p=d2 / total) if total > 0 else rng.integers(sample.size)
        seeds.append(sample[pick])
        d2 = np.minimum(d2, (sample - seeds[-1]) ** 2)
    return np.sort(np.array(seeds))


def _lloyd(v, centroids, iterations=25):
    """1-D Lloyd iterations with sorted boundaries (no n x k matrix)."""
    c = np.sort(centroids)
    for _ in range(iterations):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        counts = np.bincount(idx, minlength=c.size)
        sums = np.bincount(idx, weights=v, minlength=c.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = np.sort(new)
    return c


def quantization_error(values: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances from each value to its nearest centroid."""
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64).ravel()
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
    return float(((v - c[idx]) ** 2).sum())


@keras.saving.register_keras_serializable(package="collabopt")
class ClusterWeights(Transform):
    """``centroids[nearest(w)]`` (+ straight-through gradient to w), zeros pinned if asked."""

    def __init__(self, clusters: int, init: str = "kmeans++", per_channel: bool = False,
                 preserve_sparsity: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.clusters = int(clusters)
        self.init = init
        self.per_channel = bool(per_channel)
        self.preserve_sparsity = bool(preserve_sparsity)

    @property
    def free_centroids(self) -> int:
        return self.clusters - 1 if self.preserve_sparsity else self.clusters

    def build_for(self, shape):
        super().build_for(shape)
        rows = self.n_channels() if self.per_channel else 1
        self.centroids = self.add_weight(name="centroids", shape=(rows, self.free_centroids),
                                         initializer="zeros", trainable=True)
        if self.preserve_sparsity:
            self.mask = self.add_weight(name="mask", shape=shape, initializer="ones",
                                        trainable=False, aggregation="only_first_replica")

    def initialize(self, weight):
        w = np.asarray(weight)
        nonzero = w != 0 if self.preserve_sparsity else np.ones(w.shape, bool)
        rows = (registry.channels_first_2d_np(w, self.channel_axes) if self.per_channel
                else w.reshape(1, -1))
        keep = (registry.channels_first_2d_np(nonzero, self.channel_axes) if self.per_channel
                else nonzero.reshape(1, -1))
        k = self.free_centroids
        table = np.zeros((rows.shape[0], k))
        for r, (row, m) in enumerate(zip(rows, keep, strict=True)):
            values = row[m]
            distinct = np.unique(values)
            if distinct.size == 0:
                continue
            if distinct.size <= k:  # already within the bound: keep the values exactly
                table[r] = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
            else:
                table[r] = init_centroids(values, k, self.init, seed=r)
        self.centroids.assign(table.astype("float32"))
        if self.preserve_sparsity:
            self.mask.assign(nonzero.astype("float32"))

    def apply(self, w, training=False):
        c = self.centroids
        if self.preserve_sparsity:  # the pinned 0 is a value the surviving weights may take
            c = ops.concatenate([c, ops.zeros((ops.shape(c)[0], 1), c.dtype)], axis=-1)
        c = ops.cast(ops.take_along_axis(c, ops.argsort(c, axis=-1), axis=-1), w.dtype)
        bounds = (c[:, 1:] + c[:, :-1]) / 2
        if self.per_channel:
            w2 = registry.channels_first_2d(w, self.channel_axes)
            idx = ops.zeros(ops.shape(w2), "int32")
            for j in range(self.clusters - 1):
                idx = idx + ops.cast(w2 > bounds[:, j:j + 1], "int32")
            q2 = ops.take_along_axis(c, idx, axis=-1)
            q = registry.from_channels_first_2d(q2, w.shape, self.channel_axes)
        else:
            flat = ops.reshape(w, (-1,))
            idx = ops.searchsorted(bounds[0], flat)
            q = ops.reshape(ops.take(c[0], idx), w.shape)
        out = q + (w - ops.stop_gradient(w))  # value: centroid; gradient: to w and centroid
        if self.preserve_sparsity:
            out = out * ops.cast(self.mask, w.dtype)
        return out

    def get_config(self):
        return {**super().get_config(), "clusters": self.clusters, "init": self.init,
                "per_channel": self.per_channel, "preserve_sparsity": self.preserve_sparsity}


def _check(clusters, init, preserve_sparsity):
    if isinstance(clusters, bool) or not isinstance(clusters, int):
        raise TypeError(f"clusters must be an int, got {clusters!r}")
    if clusters < 2:
        raise ValueError(f"clusters must be >= 2, got {clusters}")
    if preserve_sparsity and clusters < 3:
        raise ValueError(f"clusters must be >= 3 when sparsity is preserved (one centroid is "
                         f"pinned at 0), got {clusters}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if preserve_sparsity not in (None, True, False):
        raise ValueError(f"preserve_sparsity must be None (detect), True or False, "
                         f"got {preserve_sparsity!r}")


BATCHNORM = ("fold", "keep")


def cluster(
    model: keras.Model,
    clusters: int,
    init: str = "kmeans++",
    per_channel: bool | str = False,
    preserve_sparsity: bool | None = None,
    layers: LayerSelector = None,
    verbose: bool = True,
    batchnorm: str = "fold",
) -> keras.Model:
    """Return a copy of ``model`` whose selected kernels share ``clusters`` values (per tensor,
    or per output channel), trainable with plain ``fit``; :func:`collabopt.strip` it after.

    ``per_channel="auto"``: per output channel where the int8 file gives the kernel one scale
    per channel (conv, depthwise), per tensor for Dense kernels, which QAT and
    :func:`collabopt.export_tflite` give one scale: there a per-channel codebook buys nothing
    against batch-norm folding and multiplies the values the file holds (MNIST CNN: Vela
    weights 1.3-1.6x tfmot's with every kernel per channel).

    Batch norm: the converter folds a BN into the kernel before it, rescaling each output
    channel, which a per-tensor codebook does not survive. ``batchnorm="fold"`` (default)
    therefore folds each BN behind a per-tensor-clustered kernel first (said in the summary);
    a kernel inside a user's layer that also holds a BN, out of our reach to fold, is
    clustered per channel, where the fold is exact. ``"keep"`` leaves every BN in place and
    refuses a per-tensor codebook behind one.
    """
    _check(clusters, init, preserve_sparsity)
    if per_channel not in (True, False, "auto"):
        raise ValueError(f"per_channel must be True, False or \"auto\", got {per_channel!r}")
    if batchnorm not in BATCHNORM:
        raise ValueError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")

    def channelwise(spec) -> bool:
        return spec.int8_per_channel if per_channel == "auto" else bool(per_channel)

    model, notes = _fold_behind_per_tensor(model, layers, channelwise, batchnorm)

    def make_chains(layer, specs, explicit):
        chains = {}
        nested_bn = holds_batchnorm(host_layer(layer))
        for s in specs:
            per_ch = channelwise(s) or nested_bn
            if per_ch and not channelwise(s):
                notes.append(f"{layer.name}: {s.name} per channel (a batch norm inside "
                             f"{type(host_layer(layer)).__name__} is folded by the converter)")
            w = current_weight(layer, s.name)
            found = structure.detect(w, s.channel_axes)
            keep_zeros = found.sparse if preserve_sparsity is None else preserve_sparsity
            if keep_zeros and clusters < 3:
                return "needs clusters >= 3 to keep its zeros"
            free = clusters - 1 if keep_zeros else clusters
            distinct = np.unique(w[w != 0] if keep_zeros else w).size
            if not per_ch and distinct <= free:
                return (f"{s.name} has only {distinct} distinct values, not more than "
                        f"clusters={clusters}: nothing to cluster")
            chains[s.name] = [ClusterWeights(
                clusters, init=init, per_channel=per_ch, preserve_sparsity=keep_zeros,
                channel_axes=s.channel_axes, reduction_axes=s.reduction_axes)]
        return chains

    result = apply_to_model(model, "cluster", make_chains, layers=layers, verbose=verbose)
    if verbose and notes:
        print("collabopt.cluster: " + "; ".join(notes))
    return result


def _fold_behind_per_tensor(model, layers, channelwise, batchnorm):
    """Fold the batch norms behind selected per-tensor-clustered kernels (``"fold"``), or
    refuse them with the fix; returns the model and what was done, for the summary."""
    match, _ = layer_matcher(layers)

    def per_tensor(producer) -> bool:
        specs = registry.weight_specs(host_layer(producer)) or ()
        selected = match is None or match(producer)
        return bool(selected) and any(not channelwise(s) for s in specs)

    producers = {id(layer): layer for layer in iter_layers(model)}
    behind = {k: bn for k, bn in _bn_pairs(model, wrapped=True).items()
              if per_tensor(producers[k])}
    if not behind:
        return model, []
    names = ", ".join(f"{bn.name!r} behind {producers[k].name!r}" for k, bn in behind.items())
    wrapped = [producers[k].name for k in behind if isinstance(producers[k], OptimizedLayer)]
    if batchnorm == "keep" or wrapped:
        why = (f"layers {wrapped} are already wrapped; call collabopt.strip(model) first so "
               "they can be folded" if wrapped and batchnorm == "fold" else
               "or pass batchnorm=\"fold\" (folds them first)")
        raise ValueError(
            f"collabopt.cluster: per-tensor codebooks would not survive export behind batch "
            f"norm ({names}): the converter folds each BN into the kernel, rescaling its "
            f"channels. Cluster those per channel (per_channel=True or \"auto\"), {why}.")
    folded = _fold_where(model, lambda producer: id(producer) in behind)
    pairs = [f"{bn.name} -> {producers[k].name}" for k, bn in behind.items()]
    shown = ", ".join(pairs[:3]) + (f", ... ({len(pairs)} in all)" if len(pairs) > 3 else "")
    return folded, [f"folded batch norm into the kernel before it first ({shown}): per-tensor "
                    "codebooks survive the converter only on folded kernels"]
