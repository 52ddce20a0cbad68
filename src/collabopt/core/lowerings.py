"""Layers that TFLite lowers to several int8 ops, written out op by op.

A ``Rescaling`` becomes MUL then ADD, a ``Normalization`` SUB then MUL, a
``LayerNormalization`` MEAN, SUB, MUL, MEAN, ADD, RSQRT, MUL, MUL, ADD. Each op's output is an
int8 tensor with its own scale, so QAT needs a range on every one of them: the wrapper runs
these functions in place of the layer's call, with ``q(i, tensor)`` fake-quantizing the
``i``-th inner tensor (the last op's output gets the wrapper's output range).

Attention is its projections, the scaled query, two BATCH_MATMULs and a softmax; an LSTM or
GRU is unrolled into its steps' FULLY_CONNECTED, ADD, SPLIT, LOGISTIC, TANH and MUL ops, one
range per tensor of a step shared by all steps, the hidden state on the output's range (the
next step reads it). With these, QAT models export fully int8 with no calibration data.

Written this way, a layer norm also needs no NEG op: Keras computes ``-mean * inv + beta``,
and the converter has no int8 NEG, so post-training export uses the same function with no
ranges (``export_form``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import ops

from collabopt.core import activations

#: the index ``q`` gives the wrapper's output range (a recurrent state carries it)
OUTPUT = -1


@dataclass(frozen=True)
class Lowering:
    inner_tensors: int
    call: Callable  # (layer, x, q, *args, training=, **kwargs) -> output
    owns_output: bool = False  # the call applies q(OUTPUT, ...) itself


def _rescaling(layer, x, q, training=None):
    y = x * ops.cast(layer.scale, x.dtype)
    if isinstance(layer.offset, (int, float)) and layer.offset == 0:
        return y
    return q(0, y) + ops.cast(layer.offset, x.dtype)


def _normalization(layer, x, q, training=None):
    denominator = ops.maximum(ops.sqrt(layer.variance), keras.backend.epsilon())
    return q(0, x - layer.mean) * ops.cast(1.0 / denominator, x.dtype)


def _axes(layer) -> tuple[int, ...]:
    return (layer.axis,) if isinstance(layer.axis, int) else tuple(layer.axis)


def _layer_norm(layer, x, q, training=None):
    axis = _axes(layer)
    mean = q(0, ops.mean(x, axis=axis, keepdims=True))
    centred = q(1, x - mean)
    variance = q(3, ops.mean(q(2, centred * centred), axis=axis, keepdims=True))
    # a variance below half of its int8 step rounds to 0, and rsqrt(0) = inf gives NaN
    # gradients (the clamp's zero slope times inf; a trained keyword transformer's QAT
    # diverged at step 8, measured). TFLite's int8 RSQRT maps 0 to its largest output; the
    # floor at epsilon does the same through the output range's clamp, with finite slopes
    inv = q(5, ops.rsqrt(ops.maximum(q(4, variance + layer.epsilon),
                                     max(layer.epsilon, 1e-6))))
    y = centred * inv
    if layer.gamma is not None:
        y = q(6, y) * _broadcast(layer, layer.gamma, x)
    if layer.beta is not None:
        y = q(7, y) + _broadcast(layer, layer.beta, x)
    return y


def _broadcast(layer, weight, x):
    shape = [1] * len(x.shape)
    for a in _axes(layer):
        shape[a] = x.shape[a]
    return ops.reshape(ops.cast(weight, x.dtype), shape)


_ATTENTION_OPTIONS = ("attention_mask", "return_attention_scores", "use_causal_mask",
                      "query_mask", "value_mask", "key_mask")


def _attention(layer, query, q, value, key=None, training=None, **options):
    """Projections (FULLY_CONNECTED), the scaled query (MUL), scores and the weighted sum
    (BATCH_MATMUL), softmax on its fixed int8 grid. Masks and returned scores run the
    layer's own call (no inner ranges: export then needs calibration data)."""
    if any(options.get(k) not in (None, False) for k in _ATTENTION_OPTIONS):
        return layer(query, value, key=key, training=training, **options)
    key = value if key is None else key
    qh = q(0, layer._query_dense(query))
    kh = q(1, layer._key_dense(key))
    vh = q(2, layer._value_dense(value))
    qh = q(3, qh * ops.cast(1.0 / math.sqrt(float(layer._key_dim)), qh.dtype))
    scores = q(4, ops.einsum(layer._dot_product_equation, kh, qh))
    probs = activations.fixed_fake_quant(layer._softmax(scores), "softmax")
    probs = layer._dropout_layer(probs, training=training)
    return layer._output_dense(q(5, ops.einsum(layer._combine_equation, probs, vh)))


# --- recurrent layers, unrolled (export unrolls them too: collabopt.export._unrolled) ----
def _gate_out(q, index, fn, z):
    """A gate activation: on its kernel's fixed int8 grid (sigmoid, tanh), else a range."""
    name = activations.name_of(fn)
    if name in activations.FIXED_RANGES:
        return activations.fixed_fake_quant(fn(z), name)
    return z if name == "linear" else q(index, fn(z))


def _split(q, index, z, parts):
    """SPLIT, each part on its input's grid (the converter leaves a SPLIT whose outputs carry
    no range in float); the range learns from the whole tensor only."""
    return [q(index, part, observe=False) for part in ops.split(z, parts, axis=-1)]


def _lstm_step(cell, x, h, c, q, r, out):
    """One step of ``LSTMCell``: x W + b, h U and their sum get ranges (``r``: this layer's
    first range index), one matmul for all four gates then SPLIT (which keeps its input's
    scale), so each kernel reaches its FULLY_CONNECTED as QAT quantized it, codebook
    intact (a slice per gate would be re-quantized by the converter); the carry's two
    products and sum get theirs; the new state gets ``out``, shared by every step (the next
    step's matmul reads it)."""
    z = ops.matmul(x, cell.kernel)
    if cell.use_bias:
        z = z + cell.bias
    if h is None:  # the first step: zero state, no recurrent terms
        z, index = q(r, z), r
    else:
        z, index = q(r + 2, q(r, z) + q(r + 1, ops.matmul(h, cell.recurrent_kernel))), r + 2
    i, f, g, o = _split(q, index, z, 4)
    act, rec = cell.activation, cell.recurrent_activation
    i, f, o = (_gate_out(q, r + 6, rec, v) for v in (i, f, o))
    ig = i * _gate_out(q, r + 7, act, g)
    c = q(r + 4, ig) if c is None else q(r + 5, q(r + 3, f * c) + q(r + 4, ig))
    return q(out, o * _gate_out(q, r + 8, act, c)), c


def _gru_step(cell, x, h, _, q, r, out):
    """One step of ``GRUCell`` (``reset_after=True``, the Keras default), fused as the LSTM's."""
    if not cell.reset_after:
        return _gru_v1_step(cell, x, h, q, r, out)
    mx = ops.matmul(x, cell.kernel)
    if cell.use_bias:
        mx = mx + cell.bias[0]
    xz, xr, xh = _split(q, r, q(r, mx), 3)
    if h is not None:
        mh = ops.matmul(h, cell.recurrent_kernel)
        hz, hr, hh = _split(q, r + 1, q(r + 1, mh + cell.bias[1] if cell.use_bias else mh), 3)
    else:  # the first step: zero state, the recurrent terms are their bias alone
        hz, hr, hh = ops.split(cell.bias[1], 3) if cell.use_bias else (0.0, 0.0, 0.0)
    rec = cell.recurrent_activation
    z = _gate_out(q, r + 9, rec, q(r + 2, xz + hz))
    gate = _gate_out(q, r + 9, rec, q(r + 3, xr + hr))
    hh = _gate_out(q, r + 10, cell.activation, q(r + 5, xh + q(r + 4, gate * hh)))
    keep = q(r + 7, 1.0 - z) * hh
    return q(out, keep if h is None else q(r + 6, z * h) + q(r + 8, keep)), None


def _gru_v1_step(cell, x, h, q, r, out):
    """One step of ``GRUCell(reset_after=False)``: the reset gate scales the state *before*
    its matmul, so the recurrent kernel runs as two FULLY_CONNECTED, its update/reset
    columns on h and its candidate columns on r * h (range ``r + 11``, the 12th)."""
    units = cell.units
    mx = ops.matmul(x, cell.kernel)
    if cell.use_bias:
        mx = mx + cell.bias
    xz, xr, xh = _split(q, r, q(r, mx), 3)
    rec = cell.recurrent_activation
    if h is None:  # the first step: zero state, no recurrent terms
        z = _gate_out(q, r + 9, rec, xz)
        return q(out, q(r + 7, 1.0 - z) * _gate_out(q, r + 10, cell.activation, xh)), None
    hz, hr = _split(q, r + 1, q(r + 1, ops.matmul(h, cell.recurrent_kernel[:, :2 * units])), 2)
    z = _gate_out(q, r + 9, rec, q(r + 2, xz + hz))
    gate = _gate_out(q, r + 9, rec, q(r + 3, xr + hr))
    candidate = q(r + 11, ops.matmul(q(r + 4, gate * h), cell.recurrent_kernel[:, 2 * units:]))
    hh = _gate_out(q, r + 10, cell.activation, q(r + 5, xh + candidate))
    return q(out, q(r + 6, z * h) + q(r + 8, q(r + 7, 1.0 - z) * hh)), None


_RNN_RANGES = 11  # inner ranges of one recurrent layer (the GRU needs them all)


def _ranges(rnn) -> int:
    """Inner ranges of one recurrent layer: 11, or 12 for a GRU with ``reset_after=False``
    (kept apart, so saved QAT models of the others keep their layout)."""
    return _RNN_RANGES + (not getattr(rnn.cell, "reset_after", True))


def _recurrent(layer, x, q, r, out):
    step = _lstm_step if isinstance(layer, keras.layers.LSTM) else _gru_step
    h = c = None
    outputs = []
    for t in reversed(range(x.shape[1])) if layer.go_backwards else range(x.shape[1]):
        h, c = step(layer.cell, x[:, t], h, c, q, r, out)
        outputs.append(h)
    return ops.stack(outputs, axis=1) if layer.return_sequences else h


def _plain_call(options) -> bool:
    return any(options.get(k) is not None for k in ("mask", "initial_state"))


def _rnn(layer, x, q, training=None, **options):
    """LSTM / GRU unrolled step by step with a range on every int8 tensor of a step, shared
    by all steps; the hidden state carries the layer's output range. Variable lengths, masks
    and initial states run the layer's own call (export then needs calibration data)."""
    if x.shape[1] is None or _plain_call(options):
        return layer(x, training=training, **options)
    return _recurrent(layer, x, q, 0, OUTPUT)


def _bidirectional(layer, x, q, training=None, **options):
    if x.shape[1] is None or _plain_call(options):
        return layer(x, training=training, **options)
    # concatenated, both states carry the output's range: the int8 CONCATENATION keeps one
    # scale, which the converter would otherwise push into both recurrences (measured: 12 %
    # of the output range off); a sum, mean or product gets its own range after the merge
    concat = layer.merge_mode == "concat"
    n = _ranges(layer.forward_layer)
    y = _recurrent(layer.forward_layer, x, q, 0, OUTPUT if concat else n)
    y_rev = _recurrent(layer.backward_layer, x, q, n + 1, OUTPUT if concat else 2 * n + 1)
    if layer.return_sequences:
        y_rev = ops.flip(y_rev, axis=1)
    merge = {"concat": lambda a, b: ops.concatenate([a, b], axis=-1), "sum": ops.add,
             "ave": lambda a, b: (a + b) / 2, "mul": ops.multiply}[layer.merge_mode]
    return merge(y, y_rev)


def _unrollable(rnn) -> bool:
    """An LSTM / GRU (not a subclass) whose call the unrolled form reproduces."""
    return (type(rnn) in (keras.layers.LSTM, keras.layers.GRU) and not rnn.stateful
            and not rnn.return_state and rnn.cell.dropout == 0
            and rnn.cell.recurrent_dropout == 0)


def get(layer) -> Lowering | None:
    """The lowering of ``layer``, None when TFLite lowers it to one op (or ours is unknown)."""
    L = keras.layers
    if isinstance(layer, L.Rescaling):
        return Lowering(1, _rescaling)
    if isinstance(layer, L.Normalization) and not layer.invert:
        return Lowering(1, _normalization)
    if isinstance(layer, L.LayerNormalization) and not layer.rms_scaling:
        return Lowering(8, _layer_norm)
    if (type(layer) is L.MultiHeadAttention and not getattr(layer, "_use_gate", False)
            and getattr(layer, "_query_dense", None) is not None):
        return Lowering(6, _attention)
    if _unrollable(layer):
        return Lowering(_ranges(layer), _rnn, owns_output=True)
    if (isinstance(layer, L.Bidirectional) and layer.merge_mode in ("concat", "sum", "ave",
                                                                    "mul")
            and _unrollable(layer.forward_layer) and _unrollable(layer.backward_layer)):
        return Lowering(2 * _ranges(layer.forward_layer) + 2, _bidirectional,
                        owns_output=layer.merge_mode == "concat")
    return None


def _no_range(_, tensor):
    return tensor


@contextlib.contextmanager
def export_form(layers):
    """Run the layer norms among ``layers`` as their op-by-op form (no NEG) while exporting."""
    patched = [layer for layer in layers if isinstance(layer, keras.layers.LayerNormalization)
               and get(layer) is not None and "call" not in vars(layer)]
    for layer in patched:
        form = get(layer).call
        object.__setattr__(layer, "call",
                           lambda x, *a, _layer=layer, _form=form, **k: _form(_layer, x,
                                                                             _no_range))
    try:
        yield
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
