"""Quantization-aware training that keeps the structure a model already has.

``quantize`` detects, per weight, what earlier stages left behind (zeros -> PQAT, a small
codebook -> CQAT, both -> PCQAT, per-channel codebooks -> per-channel CQAT/PCQAT) and builds
the chain ``[keep zeros / keep codebook] -> int8 fake-quant``. Weights are fake-quantized
symmetrically (zero stays integer 0, k centroids stay <= k integers): per output channel, as
the converter does, except where a per-tensor codebook must survive, which gets one scale.
Activations get EMA ranges at every point TFLite quantizes.

Batch norm: ``batchnorm="keep"`` (default) leaves a BN in place, training on batch
statistics, wherever the converter's later fold is exact: behind a weight quantized per
output channel, scaling a channel rescales its int8 grid and keeps its zeros and its
distinct values. A weight with one scale per tensor (a per-tensor codebook, a Dense kernel)
is folded first in any mode, since a per-channel rescale would break its grid.
``batchnorm="fold"`` folds every BN first, so QAT trains the very weights the file holds.
Keeping BN lets pruned and per-channel-clustered models recover better (DS-CNN-L and
MobileNet v1 up to 5 points, MNIST unchanged: docs/BENCHMARKS.md).

Departure from the design's "append, never replace": ``quantize`` first strips a wrapped
model, because folding needs plain layers. The structure survives the strip by
construction, and is detected again from the values.
"""

from __future__ import annotations

import keras
from keras import ops

from collabopt.batchnorm import (  # noqa: F401 - fold_batchnorm is public from here too
    FoldedBatchNorm,
    _bn_pairs,
    _fold_where,
    fold_batchnorm,
    fold_batchnorm_behind_per_tensor,
)
from collabopt.clustering import ClusterWeights
from collabopt.core import lowerings, registry, structure
from collabopt.core.rewrite import (
    LayerSelector,
    apply_to_model,
    is_wrapped,
    iter_layers,
    layer_matcher,
    strip,
)
from collabopt.core.transform import Transform
from collabopt.core.wrapper import OptimizedLayer, QuantizedOp
from collabopt.pruning import PruneMask, fixed_mask

PRESERVE = (None, "none", "sparsity", "clusters", "all")
BATCHNORM = ("fold", "keep")


@keras.saving.register_keras_serializable(package="collabopt")
class WeightFakeQuant(Transform):
    """Symmetric int8 fake-quant, narrow range [-127, 127], straight-through gradient."""

    kept_at_export = True

    def __init__(self, per_channel: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.per_channel = bool(per_channel)

    def apply(self, w, training=False):
        rank = len(w.shape)
        axes = [a % rank for a in self.channel_axes]
        if self.per_channel and axes == list(range(rank - len(axes), rank)):
            shape = w.shape
            w_c = ops.reshape(w, tuple(shape[: rank - len(axes)]) + (-1,)) if len(axes) > 1 else w
            reduce = tuple(range(len(w_c.shape) - 1))
            bound = ops.maximum(ops.stop_gradient(ops.max(ops.abs(w_c), axis=reduce)), 1e-8)
            q = keras.quantizers.fake_quant_with_min_max_vars(
                w_c, -bound, bound, num_bits=8, narrow_range=True, axis=-1)
            return ops.reshape(q, shape)
        bound = ops.maximum(ops.stop_gradient(ops.max(ops.abs(w))), 1e-8)
        return keras.quantizers.fake_quant_with_min_max_vars(
            w, -bound, bound, num_bits=8, narrow_range=True)

    def get_config(self):
        return {**super().get_config(), "per_channel": self.per_channel}


# --- quantize ----------------------------------------------------------------------------
def _fused_into_activation(model, kept_bns: frozenset[int] = frozenset()) -> set[str]:
    """Layers whose only consumer is a ReLU (possibly through a batch norm the converter
    folds: a folded-BN identity, or a BN in ``kept_bns``).

    The converter fuses such a layer with its ReLU and quantizes only the ReLU's output, so
    QAT must not fake-quantize the pre-activation tensor too: doing so simulates a coarser
    grid than the file uses, an error that compounds with depth.
    """
    def fusable(layer):
        if isinstance(layer, keras.layers.ReLU):
            cfg = layer.get_config()
            return cfg.get("negative_slope", 0) == 0 and cfg.get("threshold", 0) == 0 and (
                cfg.get("max_value") in (None, 6.0, 6))
        return isinstance(layer, keras.layers.Activation) and layer.get_config().get(
            "activation") in ("relu", "relu6")

    def consumers(layer):
        return [node.operation for node in layer._outbound_nodes]

    names = set()
    for layer in model.layers:
        if registry.weight_specs(layer) is None:
            continue
        nxt = consumers(layer)
        if len(nxt) == 1 and (isinstance(nxt[0], FoldedBatchNorm) or id(nxt[0]) in kept_bns):
            nxt = consumers(nxt[0])
        if len(nxt) == 1 and fusable(nxt[0]):
            names.add(layer.name)
    return names


def _input_consumers(model) -> set[str]:
    if isinstance(model, keras.Sequential):
        return {model.layers[0].name} if model.layers else set()
    inputs = {id(t) for t in getattr(model, "inputs", None) or []}
    names = set()
    for layer in model.layers:
        for node in layer._inbound_nodes:
            if any(id(t) in inputs for t in node.input_tensors):
                names.add(layer.name)
    return names


def quantize(
    model: keras.Model,
    preserve: str | None = None,
    layers: LayerSelector = None,
    verbose: bool = True,
    batchnorm: str = "keep",
) -> keras.Model:
    """Return a QAT copy of ``model`` (PQAT / CQAT / PCQAT when the weights call for it).

    ``preserve=None`` detects per weight; "none", "sparsity", "clusters" or "all" forces a
    scheme, and forcing one no selected weight has is an error. ``batchnorm="keep"`` trains
    batch norm on batch statistics behind per-channel-quantized weights, "fold" folds it
    first everywhere (see the module docstring).
    """
    if preserve not in PRESERVE:
        raise ValueError(f"preserve must be one of {PRESERVE}, got {preserve!r}")
    if batchnorm not in BATCHNORM:
        raise ValueError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")
    if is_wrapped(model):
        model = strip(model)
    kept = _bns_to_keep(model, preserve, layers) if batchnorm == "keep" else {}
    model = _fold_where(model, lambda producer: producer.name not in kept)
    kept_bns = {id(layer) for layer in iter_layers(model) if layer.name in kept.values()}
    consumers = _input_consumers(model)
    fused = _fused_into_activation(model, frozenset(kept_bns))
    # a kept BN is folded into its producer by the converter: the range belongs after the BN
    # (or after the ReLU that follows it), never between the two
    silent_bns = {bn for producer, bn in kept.items() if producer in fused}
    found: dict[str, bool] = {"sparsity": False, "clusters": False}

    def make_chains(layer, specs, explicit):
        chains = {}
        for s in specs:
            w = registry.find_variable(layer, s.name).numpy()
            st = structure.detect(w, s.channel_axes)
            keep_zeros = st.sparse and preserve in (None, "sparsity", "all")
            keep_codebook = st.clustered and preserve in (None, "clusters", "all")
            found["sparsity"] |= keep_zeros
            found["clusters"] |= keep_codebook
            chain: list[Transform] = []
            axes = dict(channel_axes=s.channel_axes, reduction_axes=s.reduction_axes)
            if keep_codebook:
                per_channel = not st.clustered_per_tensor
                rows = (registry.channels_first_2d_np(w, s.channel_axes) if per_channel
                        else w.reshape(1, -1))
                if keep_zeros:  # free centroids for the non-zero values, plus the pinned 0
                    k = 1 + int(structure.distinct_nonzero(rows)[0].max())
                else:
                    k = int(structure.unique_per_channel(rows).max())
                chain.append(ClusterWeights(max(k, 3 if keep_zeros else 2), init="linear",
                                            per_channel=per_channel,
                                            preserve_sparsity=keep_zeros, **axes))
            elif keep_zeros:
                chain.append(fixed_mask(st.sparsity, **axes))
            chain.append(WeightFakeQuant(
                per_channel=_int8_per_channel(s, st, preserve, layer), **axes))
            chains[s.name] = chain
        # an Embedding's output is rows of its table, on the table's grid already (a range
        # of its own made the converter dequantize and requantize the whole table)
        own_grid = isinstance(layer, keras.layers.Embedding)
        return chains, {"quantize_output": layer.name not in fused and layer.name not in kept
                        and not own_grid,
                        "quantize_input": layer.name in consumers, "quantize_inner": True}

    def wrap_other(layer):
        if isinstance(layer, keras.layers.InputLayer):
            return None
        if layer.weights and layer.name not in kept.values() and lowerings.get(layer) is None:
            return None  # outside the registry: left as it is (and reported skipped)
        pass_through = isinstance(layer, (*registry.PASS_THROUGH, keras.layers.Identity,
                                          FoldedBatchNorm)) or layer.name in silent_bns
        if pass_through and layer.name not in consumers:
            return None
        return {}, {"quantize_output": not pass_through,
                    "quantize_input": layer.name in consumers, "quantize_inner": True}

    def wrap_op(op):
        return QuantizedOp(op) if type(op).__name__ in _COMPUTING_OPS else None

    result = apply_to_model(model, "quantize", make_chains, layers=layers, verbose=verbose,
                            min_weights=0, wrap_other=wrap_other, wrap_op=wrap_op)
    for scheme in ("sparsity", "clusters"):
        if preserve in (scheme, "all") and not found[scheme]:
            raise ValueError(
                f"quantize(preserve={preserve!r}): no selected weight has {scheme} to preserve "
                f"(detected from the weights: {scheme} absent). Prune/cluster first, or use "
                "preserve=None to detect.")
    return result


#: keras.ops nodes of a functional graph that compute new values (an int8 kernel with its own
#: output scale); reshapes, slices and transposes keep their input's scale and get no range
_COMPUTING_OPS = frozenset({
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "Matmul", "Einsum", "Mean",
    "Square", "Concatenate"})


def _bns_to_keep(model, preserve, layers: LayerSelector) -> dict[str, str]:
    """{producer name: BN name} for the batch norms whose fold the converter does exactly:
    behind a selected layer whose weight is quantized per output channel."""
    match, _ = layer_matcher(layers)
    producers = {id(layer): layer for layer in iter_layers(model)}
    kept = {}
    for key, bn in _bn_pairs(model).items():
        producer = producers[key]
        specs = registry.weight_specs(producer)
        if not specs or (match is not None and not match(producer)):
            continue
        s = specs[0]
        st = structure.detect(registry.find_variable(producer, s.name).numpy(), s.channel_axes)
        if _int8_per_channel(s, st, preserve, producer):
            kept[producer.name] = bn.name
    return kept


def _int8_per_channel(spec: registry.WeightSpec, st: structure.Structure, preserve,
                      layer=None) -> bool:
    """Whether QAT fake-quantizes this weight per output channel: where the kernel takes
    per-channel scales, unless a per-tensor codebook has to keep one scale.

    1-D convolutions get one scale: the converter turns them into 2-D ones by reshaping the
    kernel and keeps the fake-quant's channel axis where it was (2 instead of 3), then
    refuses its own reshape ("'tfl.reshape' op requires 'output' type ... cast compatible").
    """
    per_tensor_codebook = (st.clustered and st.clustered_per_tensor
                           and preserve in (None, "clusters", "all"))
    if layer is not None and isinstance(registry.locate(layer, spec.name)[0], _CONV_1D):
        return False
    return spec.int8_per_channel and not per_tensor_codebook


_CONV_1D = (keras.layers.Conv1D, keras.layers.DepthwiseConv1D, keras.layers.SeparableConv1D,
            keras.layers.Conv1DTranspose)


def scheme_of(model: keras.Model) -> str:
    """"QAT", "PQAT", "CQAT" or "PCQAT" from the chains of a quantized model."""
    sparse = clustered = False
    for layer in iter_layers(model):
        if isinstance(layer, OptimizedLayer):
            for t in layer.transforms:
                sparse |= isinstance(t, PruneMask) or getattr(t, "preserve_sparsity", False)
                clustered |= isinstance(t, ClusterWeights)
    return {(False, False): "QAT", (True, False): "PQAT", (False, True): "CQAT",
            (True, True): "PCQAT"}[(sparse, clustered)]

