"""Empirical bias correction: give each layer back the mean output it had before compression.

Clustering a batch-norm-folded model moves every channel's mean output, and nothing resets it:
batch norm, which would re-estimate the statistics, is already folded in, and a short
fine-tune at a QAT learning rate barely moves a bias. Shifting each bias by the difference of
per-channel means over a few hundred inputs (Nagel et al., 2019, "Data-Free Quantization")
restores them. Only biases change, so codebooks and zeros stay exactly as they were.
"""

from __future__ import annotations

import keras
import numpy as np

from collabopt.core.rewrite import LayerSelector, host_layer, layer_matcher


def _channel_means(model: keras.Model, name: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Per-channel mean of the layer's output before its fused activation (the bias acts
    there; after a ReLU a mean no longer moves one for one with it). One layer per pass: the
    swap must not reach the layers that feed it, so several outputs cannot share a probe."""
    layer = model.get_layer(name)
    host = host_layer(layer)
    activation = getattr(host, "activation", None)
    if activation is not None:
        host.activation = keras.activations.linear
    try:
        if getattr(model, "inputs", None):  # functional or sequential: cut the graph
            probe = keras.Model(model.inputs, layer.output)
            out = np.asarray(probe.predict(x, batch_size=batch_size, verbose=0), np.float64)
        else:
            out = _recorded_outputs(model, layer, x, batch_size)
    finally:
        if activation is not None:
            host.activation = activation
    axis = 1 if getattr(host, "data_format", "channels_last") == "channels_first" \
        else out.ndim - 1
    return np.moveaxis(out, axis, -1).reshape(-1, out.shape[axis]).mean(axis=0)


def _recorded_outputs(model, layer, x, batch_size: int) -> np.ndarray:
    """A subclassed model has no graph to cut at ``layer``: run it eagerly, batch by batch,
    recording what the layer returns."""
    seen = []
    call = layer.call

    def recording(*args, **kwargs):
        out = call(*args, **kwargs)
        seen.append(keras.ops.convert_to_numpy(out))
        return out

    object.__setattr__(layer, "call", recording)
    try:
        for start in range(0, len(x), batch_size):
            model(x[start:start + batch_size], training=False)
    finally:
        object.__delattr__(layer, "call")
    return np.concatenate(seen).astype(np.float64)


def correct_bias(model: keras.Model, reference: keras.Model, x: np.ndarray,
                 layers: LayerSelector = None,
                 batch_size: int = 256) -> list[str]:
    """Shift, in place, the bias of every layer of ``model`` that has one (and a namesake in
    ``reference``) so its mean output per channel over ``x`` equals ``reference``'s.

    ``reference`` is the model before compression (e.g. the batch-norm-folded model that was
    clustered). Layers are corrected in order, each on the inputs the corrected layers before
    it produce. Returns the names of the corrected layers.
    """
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("correct_bias needs a few hundred inputs in x, got none")
    known = {layer.name for layer in reference.layers}
    match, named = layer_matcher(layers)
    missing = named - {layer.name for layer in model.layers}
    if missing:
        raise ValueError(f"layers= names {sorted(missing)}, which the model does not have")
    corrected = []
    for layer in model.layers:
        host = host_layer(layer)
        bias = getattr(host, "bias", None)
        if bias is None or layer.name not in known or (match and not match(host)):
            continue
        shift = (_channel_means(reference, layer.name, x, batch_size)
                 - _channel_means(model, layer.name, x, batch_size))
        bias.assign((np.asarray(bias.numpy(), np.float64) + shift).astype(bias.dtype))
        corrected.append(layer.name)
    return corrected
