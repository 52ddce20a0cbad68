"""Batch-norm folding: a BatchNormalization after a conv, depthwise or dense layer becomes a
per-output-channel scale and shift of that layer's kernel and bias, as the TFLite converter
does at export.

Clustering needs it first: a per-tensor codebook that the converter rescales per channel
afterwards holds up to k x channels distinct values in the file. Behind per-channel
codebooks and per-channel int8 scales the fold is exact, so batch norm may keep training.

Where it keeps training, its moving statistics are what the fold bakes in:
``settle_batchnorm`` re-estimates them when a fine-tune was too short to.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from collabopt.core import registry
from collabopt.core.rewrite import is_wrapped, iter_layers, rewrite
from collabopt.core.wrapper import OptimizedLayer

_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _foldable(producer, bn, wrapped: bool = False) -> bool:
    """Whether the converter folds ``bn`` into ``producer`` (and so can we); ``wrapped``
    judges a wrapper by its host layer (it cannot be folded before a strip)."""
    graph_layer = producer  # the one with the model's nodes (a wrapper's host has none)
    if isinstance(producer, OptimizedLayer):
        if not wrapped:
            return False
        producer = producer.layer
    if not isinstance(producer, _FOLDABLE):
        return False
    if isinstance(producer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                             keras.layers.Conv3DTranspose, keras.layers.SeparableConv1D,
                             keras.layers.SeparableConv2D)):
        return False
    if producer.get_config().get("activation", "linear") not in ("linear", None):
        return False
    rank = len(graph_layer.output.shape) if graph_layer._inbound_nodes else None
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None or (axis != -1 and (rank is None or axis != rank - 1)):
        return False
    return len(graph_layer._outbound_nodes) <= 1 and len(bn._inbound_nodes) <= 1


def _bn_pairs(model, wrapped: bool = False) -> dict[int, keras.layers.Layer]:
    """{id(producer): bn} for every BatchNormalization that directly follows a foldable layer
    (or, with ``wrapped``, a wrapped one)."""
    pairs: dict[int, keras.layers.Layer] = {}
    models = [model] + [m for m in _nested_models(model)]
    for m in models:
        if isinstance(m, keras.Sequential):
            seq = m.layers
            for prev, layer in zip(seq, seq[1:], strict=False):
                if (isinstance(layer, keras.layers.BatchNormalization)
                        and _foldable(prev, layer, wrapped)):
                    pairs[id(prev)] = layer
            continue
        for layer in m.layers:
            if not isinstance(layer, keras.layers.BatchNormalization) or not layer._inbound_nodes:
                continue
            inputs = layer._inbound_nodes[0].input_tensors
            if len(inputs) != 1:
                continue
            producer = inputs[0]._keras_history.operation
            if _foldable(producer, layer, wrapped):
                pairs[id(producer)] = layer
    return pairs


def _nested_models(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield layer
            yield from _nested_models(layer)


def _fold(producer, bn) -> keras.layers.Layer:
    kernel = producer.get_weights()[0]
    weights = dict(zip([v.name for v in bn.weights], bn.get_weights(), strict=True))
    n = weights["moving_mean"].shape[0]
    gamma = weights.get("gamma", np.ones(n))
    beta = weights.get("beta", np.zeros(n))
    scale = gamma / np.sqrt(weights["moving_variance"] + bn.epsilon)
    bias = producer.get_weights()[1] if producer.use_bias else np.zeros(n)
    if isinstance(producer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
        new_kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        new_kernel = kernel * scale
    new_bias = (bias - weights["moving_mean"]) * scale + beta
    config = producer.get_config()
    config["use_bias"] = True
    folded = producer.__class__.from_config(config)
    folded.build_from_config(producer.get_build_config())
    folded.set_weights([new_kernel.astype("float32"), new_bias.astype("float32")])
    return folded


@keras.saving.register_keras_serializable(package="collabopt")
class FoldedBatchNorm(keras.layers.Layer):
    """Marks where a BatchNormalization was folded away: the identity (keeps layer names)."""

    def call(self, inputs, **kwargs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """Return an equivalent model with each BatchNormalization folded into the conv, depthwise
    or dense layer before it (bias created when missing; the BN becomes an Identity).

    Fold before clustering per tensor: folding afterwards rescales each output channel and
    multiplies the number of distinct values per tensor in the deployed file.
    """
    if is_wrapped(model):
        raise ValueError("fold_batchnorm needs a plain model: call collabopt.strip(model) first")
    return _fold_where(model, lambda producer: True)


def fold_batchnorm_behind_per_tensor(model: keras.Model) -> keras.Model:
    """``fold_batchnorm`` only behind layers whose int8 kernel has one scale per tensor
    (Dense): the converter's fold would rescale the columns of their per-tensor codebook,
    while behind per-channel-scaled kernels it is exact and batch norm may keep training."""
    def per_tensor(producer) -> bool:
        specs = registry.weight_specs(producer)
        return bool(specs) and not specs[0].int8_per_channel

    return _fold_where(model, per_tensor)


def _fold_where(model: keras.Model, fold: Callable[[keras.layers.Layer], bool]) -> keras.Model:
    """``fold_batchnorm`` restricted to the producers ``fold`` accepts."""
    producers = {id(layer): layer for layer in iter_layers(model)}
    pairs = {k: bn for k, bn in _bn_pairs(model).items() if fold(producers[k])}
    bns = {id(bn) for bn in pairs.values()}

    def replace(layer):
        if id(layer) in pairs:
            return _fold(layer, pairs[id(layer)])
        if id(layer) in bns:
            return FoldedBatchNorm(name=layer.name)
        return None

    return rewrite(model, replace)




def holds_batchnorm(layer: keras.layers.Layer) -> bool:
    """Whether a layer holds a BatchNormalization among its sublayers (a user's block): the
    converter may fold it into a conv we cannot reach to fold first."""
    stack = [sub for _, sub in registry.sublayers(layer)]
    seen = set()
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        if isinstance(sub, keras.layers.BatchNormalization):
            return True
        stack.extend(s for _, s in registry.sublayers(sub))
    return False


def _trained_batchnorms(model) -> list[keras.layers.BatchNormalization]:
    """Every batch norm at any depth that trains (a frozen one runs on its moving values)."""
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]


def settle_batchnorm(model, batches) -> None:
    """Set every training batch norm's moving statistics (at any depth) to the mean of its
    batch statistics over ``batches`` of inputs, and leave every other state as it was.

    One forward pass in training mode with momentum i / (i + 1) at batch i makes each moving
    value the running mean of the batches; whatever else that pass updates (pruning masks
    and step counters, QAT activation ranges) is restored afterwards. Needed where the moving
    averages cannot have caught up: ``keras.applications`` use momentum 0.999, so after a
    short fine-tune they still hold mostly the parent's statistics (MobileNetV3Small pruned
    and fine-tuned 63 steps: 24.8 % on 4 classes; settled: 61.8 %)."""
    bns = _trained_batchnorms(model)
    if not bns:
        return
    moving = {id(v) for bn in bns for v in (bn.moving_mean, bn.moving_variance)}
    others = [v for v in model.non_trainable_variables if id(v) not in moving]
    saved = [ops.convert_to_numpy(v.value) for v in others]
    momenta = [bn.momentum for bn in bns]
    try:
        for i, batch in enumerate(batches):
            for bn in bns:
                bn.momentum = i / (i + 1)
            model(batch, training=True)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        for v, value in zip(others, saved, strict=True):
            v.assign(value)


def batchnorm_is_stale(model, steps: int, horizon: float = 3.0) -> bool:
    """Whether ``steps`` training steps left some batch norm's moving averages behind: the
    values before training keep the weight momentum ** steps ~ exp(-steps (1 - momentum)),
    stale while above exp(-``horizon``) = 5 % (momentum 0.999: 3,000 steps; 0.9: 30)."""
    return any(steps * (1 - bn.momentum) < horizon for bn in _trained_batchnorms(model))
