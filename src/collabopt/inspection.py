"""Look inside deployed ``.tflite`` files: what survived conversion, and does it run.

``inspect`` parses the flatbuffer directly (no interpreter, no TensorFlow) and measures every
constant weight tensor as stored: sparsity, distinct values per tensor and per output channel,
entropy. ``verify`` holds the file against the Keras model it came from. ``evaluate_tflite``
runs it with the LiteRT interpreter.

(Named ``inspection`` rather than the design's ``inspect.py``: a submodule called ``inspect``
would replace the ``collabopt.inspect`` function on the package once imported.)
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool",
           7: "int16", 9: "int8", 10: "float64"}
_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint8": np.uint8,
       "int64": np.int64, "int16": np.int16, "int8": np.int8, "float64": np.float64,
       "bool": np.bool_}
# weight input index -> axis of output channels in the TFLite layout
_WEIGHT_OPS = {"CONV_2D": (1, 0), "FULLY_CONNECTED": (1, 0), "DEPTHWISE_CONV_2D": (1, 3),
               "TRANSPOSE_CONV": (1, 0), "CONV_3D": (1, 4), "CONV_3D_TRANSPOSE": (1, 3),
               "EMBEDDING_LOOKUP": (1, 0), "GATHER": (0, 0), "BATCH_MATMUL": (1, -1),
               # a constant split at run time: a QAT recurrent kernel, one piece per gate
               "SPLIT": (1, -1)}
# ops that legitimately carry non-int8 tensors in a full-integer model
_INTEGER_OK = {"QUANTIZE", "DEQUANTIZE", "SHAPE", "STRIDED_SLICE", "PACK", "RESHAPE",
               "GATHER", "CAST"}


class InvalidModelError(ValueError):
    """The file is not a readable TFLite model."""


class VerificationError(AssertionError):
    """Structure that the Keras model had did not survive in the ``.tflite`` file."""


@dataclass
class TensorStats:
    name: str
    layer: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    quantization: str  # "per-channel", "per-tensor" or "none"
    n_scales: int
    size: int
    sparsity: float
    unique: int
    unique_per_channel_max: int
    unique_per_channel_mean: float
    entropy_bits: float
    channel_axis: int = field(repr=False, default=0)
    values: np.ndarray | None = field(repr=False, default=None, compare=False)
    scales: np.ndarray | None = field(repr=False, default=None, compare=False)
    #: the stored value of 0.0: 0 for weights (symmetric), the zero point of a table that is
    #: quantized as an activation (an Embedding's GATHER input)
    zero: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("values")
        d.pop("scales")
        d["shape"] = list(self.shape)
        return d


@dataclass
class Report:
    path: str
    size_bytes: int
    zip_bytes: int
    tensors: list[TensorStats]
    operators: list[str]
    non_integer_ops: list[str]
    input_dtype: str
    output_dtype: str

    @property
    def fully_integer(self) -> bool:
        """Integer ops only, on an int8 input or integer token ids (an ``Embedding``'s)."""
        return not self.non_integer_ops and self.input_dtype in ("int8", "int32", "int64")

    @property
    def weight_bytes(self) -> int:
        return sum(t.size * np.dtype(_NP[t.dtype]).itemsize for t in self.tensors)

    @property
    def entropy_bound_bytes(self) -> int:
        """Bytes needed by an ideal entropy coder of the weights (the compression limit)."""
        return int(math.ceil(sum(t.entropy_bits * t.size for t in self.tensors) / 8))

    @property
    def sparsity(self) -> float:
        total = sum(t.size for t in self.tensors)
        return sum(t.sparsity * t.size for t in self.tensors) / max(total, 1)

    def to_dict(self) -> dict:
        return {"path": self.path, "size_bytes": self.size_bytes, "zip_bytes": self.zip_bytes,
                "weight_bytes": self.weight_bytes, "entropy_bound_bytes": self.entropy_bound_bytes,
                "sparsity": self.sparsity, "fully_integer": self.fully_integer,
                "input_dtype": self.input_dtype, "output_dtype": self.output_dtype,
                "operators": self.operators, "non_integer_ops": self.non_integer_ops,
                "tensors": [t.to_dict() for t in self.tensors]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        head = (f"{self.path}: {self.size_bytes:,} bytes, {self.zip_bytes:,} zipped, "
                f"weights {self.weight_bytes:,} bytes (entropy bound {self.entropy_bound_bytes:,}),"
                f" sparsity {self.sparsity:.1%}, "
                f"{'fully int8' if self.fully_integer else 'NOT fully integer'}")
        rows = [f"{'layer':<24} {'op':<18} {'shape':<18} {'dtype':<7} {'quant':<12} "
                f"{'sparsity':>8} {'unique':>7} {'u/ch max':>8} {'u/ch mean':>9} {'bits':>5}"]
        for t in self.tensors:
            rows.append(f"{t.layer[:24]:<24} {t.op[:18]:<18} {str(list(t.shape)):<18} "
                        f"{t.dtype:<7} {t.quantization + '/' + str(t.n_scales):<12} "
                        f"{t.sparsity:>8.1%} {t.unique:>7} {t.unique_per_channel_max:>8} "
                        f"{t.unique_per_channel_mean:>9.1f} {t.entropy_bits:>5.2f}")
        ops = "operators: " + ", ".join(self.operators)
        flagged = ("non-integer ops: " + ", ".join(self.non_integer_ops)
                   if self.non_integer_ops else "")
        return "\n".join([head, *rows, ops] + ([flagged] if flagged else []))

    def __str__(self) -> str:
        return self.table()


def _zip_size(data: bytes, name: str) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return buf.getbuffer().nbytes


def _entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


_KERNEL_OPS = ("depthwise", "convolution", "Conv2D", "MatMul", "BiasAdd", "einsum", "conv1d",
               "conv3d", "embedding")


def kernel_op_name(tensor_name: str) -> str:
    """The part of a converter tensor name that says which layer's op made it.

    A fused name ("m/dw_bn/batchnorm/mul_1;m/dw/depthwise;...") lists every op folded into
    the tensor; the piece naming a kernel op (depthwise, convolution, MatMul...) names the
    layer, not the batch norm listed first. The model's own scope ("m/") is dropped.
    """
    pieces = tensor_name.split(";")
    piece = next((p for p in pieces if p.rsplit("/", 1)[-1].split("_")[0] in _KERNEL_OPS),
                 pieces[0])
    parts = [p for p in piece.split("/") if p]
    return "/".join(parts[1:] if len(parts) > 2 else parts)


def _layer_name(tensor_name: str) -> str:
    """Best-effort Keras layer name from a (full or shortened) converter tensor name."""
    parts = kernel_op_name(tensor_name).split("/")
    name = parts[0] if parts[0] else tensor_name
    base, _, suffix = name.rpartition("_")
    return base if suffix.isdigit() and base else name


def _load(path) -> tuple[bytes, object]:
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such .tflite file: {path}")
    data = path.read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise InvalidModelError(f"{path} is not a TFLite model (no 'TFL3' identifier; "
                                f"{len(data)} bytes). Export one with collabopt.export_tflite.")
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        if not model.subgraphs:
            raise ValueError("no subgraphs")
    except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
        raise InvalidModelError(f"{path} is a damaged or truncated TFLite file ({err!r})") from err
    return data, model


def _op_namer():
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def op_name(code):
        if code.customCode:
            return "CUSTOM:" + code.customCode.decode(errors="replace")
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "UNKNOWN")

    return op_name


def operator_outputs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(operator, Keras layer it comes from) for every operator of the file, in order."""
    _, model = _load(path)
    op_name, graph = _op_namer(), model.subgraphs[0]
    out = []
    outputs = set(graph.outputs)

    def activation(i):
        data = model.buffers[graph.tensors[i].buffer].data
        return data is None or len(data) == 0

    producer = {i: op for op in graph.operators or [] for i in op.outputs if i >= 0}

    def name(i):
        return graph.tensors[i].name.decode(errors="replace")

    def layer_tensor(i, depth=0):
        # converter-made tensors (a DEQUANTIZE's "tfl.dequantize", a graph output named after
        # the signature) say nothing: look at what produced them
        if not (name(i).startswith(_UNNAMED) or i in outputs) or depth > 3:
            return name(i)
        op = producer.get(i)
        ins = [j for j in (op.inputs if op is not None else []) if j >= 0 and activation(j)]
        return layer_tensor(ins[0], depth + 1) if ins else name(i)

    for op in graph.operators or []:
        # an op's output names its layer; a graph output or a converter-made tensor does
        # not: then the last input, traced back through dequantize ops
        ids = [i for i in op.outputs if i >= 0 and i not in outputs
               and not name(i).startswith(_UNNAMED)]
        if ids:
            tensor = name(ids[0])
        else:
            ins = [i for i in reversed(op.inputs) if i >= 0 and activation(i)]
            tensor = layer_tensor(ins[0]) if ins else "?"
        out.append((op_name(model.operatorCodes[op.opcodeIndex]), _layer_name(tensor)))
    return out


_UNNAMED = ("tfl.", "StatefulPartitionedCall", "serving_default")


def _non_integer(name: str, op, graph) -> str | None:
    """"NAME(float)" or the custom op's name when the operator is not an integer kernel."""
    if name.startswith("CUSTOM:") or name == "FLEX_DELEGATE" or name.startswith("Flex"):
        return name
    io_types = {_DTYPES.get(graph.tensors[i].type, "?")
                for i in list(op.inputs) + list(op.outputs) if i >= 0}
    if io_types & {"float32", "float16"} and name not in _INTEGER_OK:
        return f"{name}(float)"
    return None


def non_integer_operators(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(operator, Keras layer it comes from) for each operator that is not integer."""
    _, model = _load(path)
    op_name, graph = _op_namer(), model.subgraphs[0]
    named = operator_outputs(path)
    return [(problem, layer) for op, (_, layer) in zip(graph.operators or [], named, strict=True)
            if (problem := _non_integer(op_name(model.operatorCodes[op.opcodeIndex]), op,
                                        graph))]


def inspect(path: str | os.PathLike) -> Report:
    """Per-weight-tensor statistics of a ``.tflite`` file, read from the flatbuffer."""
    data, model = _load(path)
    op_name = _op_namer()
    graph = model.subgraphs[0]
    tensors, operators, flagged, seen = [], [], [], set()
    try:
        for op in graph.operators or []:
            name = op_name(model.operatorCodes[op.opcodeIndex])
            operators.append(name)
            problem = _non_integer(name, op, graph)
            if problem:
                flagged.append(problem)
            if name not in _WEIGHT_OPS:
                continue
            idx, axis = _WEIGHT_OPS[name]
            if idx >= len(op.inputs) or op.inputs[idx] < 0 or op.inputs[idx] in seen:
                continue
            t = graph.tensors[op.inputs[idx]]
            buf = model.buffers[t.buffer]
            if buf.data is None or len(buf.data) == 0:
                if buf.offset:
                    raw = data[buf.offset:buf.offset + buf.size]
                else:
                    continue  # not a constant (an activation input)
            else:
                raw = bytes(np.asarray(buf.data, dtype=np.uint8))
            seen.add(op.inputs[idx])
            tensors.append(_stats(t, raw, name, axis))
    except (IndexError, TypeError, AttributeError) as err:
        raise InvalidModelError(f"{path} has inconsistent contents ({err!r})") from err
    io_dtype = [_DTYPES.get(graph.tensors[i].type, "?") for i in (graph.inputs[0],
                                                                   graph.outputs[0])]
    return Report(str(path), len(data), _zip_size(data, Path(path).name), tensors, operators,
                  sorted(set(flagged)), io_dtype[0], io_dtype[1])


def _stats(t, raw: bytes, op: str, axis: int) -> TensorStats:
    dtype = _DTYPES.get(t.type, "?")
    shape = tuple(int(s) for s in t.shape)
    values = np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)
    q = t.quantization
    scales = np.asarray(q.scale) if q is not None and q.scale is not None else None
    n_scales = 0 if scales is None else int(scales.size)
    if n_scales > 1:
        axis = int(q.quantizedDimension)
    axis = axis % len(shape)
    per_ch = np.moveaxis(values, axis, 0).reshape(shape[axis], -1)
    per_ch_unique = 1 + np.count_nonzero(np.diff(np.sort(per_ch, axis=1), axis=1), axis=1)
    name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
    points = q.zeroPoint if q is not None and q.zeroPoint is not None else ()
    zero = int(points[0]) if len(points) == 1 else 0
    return TensorStats(
        name=name, layer=_layer_name(name), op=op, shape=shape, dtype=dtype,
        quantization="none" if n_scales == 0 else "per-tensor" if n_scales == 1 else
        "per-channel", n_scales=n_scales, size=int(values.size),
        sparsity=float(np.mean(values == zero)), unique=int(np.unique(values).size),
        unique_per_channel_max=int(per_ch_unique.max()),
        unique_per_channel_mean=float(per_ch_unique.mean()), entropy_bits=_entropy(values),
        channel_axis=axis, values=values, scales=scales, zero=zero)


# --- verify --------------------------------------------------------------------------------
@dataclass
class WeightCheck:
    layer: str
    weight: str
    found: bool
    keras_sparsity: float = 0.0
    file_sparsity: float = 0.0
    zeros_lost: int = 0
    keras_unique: int = 0
    file_unique: int = 0
    keras_unique_per_channel_max: int = 0
    file_unique_per_channel_max: int = 0

    @property
    def problems(self) -> list[str]:
        if not self.found:
            return ["missing from the file"]
        out = []
        if self.zeros_lost:
            out.append(f"{self.zeros_lost} zero(s) became non-zero")
        if self.file_unique > self.keras_unique:
            out.append(f"unique per tensor grew {self.keras_unique} -> {self.file_unique}")
        if self.file_unique_per_channel_max > self.keras_unique_per_channel_max:
            out.append(f"unique per channel grew {self.keras_unique_per_channel_max} -> "
                       f"{self.file_unique_per_channel_max}")
        return out


def _layouts(w: np.ndarray, shape: tuple[int, ...], channel_axes: tuple[int, ...]):
    """Candidate TFLite layouts of a Keras weight: channels moved first, or kept last."""
    rank = w.ndim
    axes = [a % rank for a in channel_axes]
    rest = [a for a in range(rank) if a not in axes]
    out = []
    for perm in (axes + rest, rest + axes):
        moved = np.transpose(w, perm)
        if moved.size == int(np.prod(shape)):
            out.append(moved.reshape(shape))
    return out


def _scaled_error(file_values: np.ndarray, keras_values: np.ndarray) -> float:
    """Relative error after the best scale per output channel (first or last file axis).

    The converter folds a following batch norm into the kernel, multiplying each output
    channel by its own factor; matching must not depend on that factor, or a pruned model
    with batch norm gets its kernels paired with another layer's of the same size.
    """
    best = np.inf
    energy = float(np.sum(file_values ** 2)) or 1.0
    for axis in {0, file_values.ndim - 1}:
        f = np.moveaxis(file_values, axis, 0).reshape(file_values.shape[axis], -1)
        k = np.moveaxis(keras_values, axis, 0).reshape(file_values.shape[axis], -1)
        kk = np.sum(k * k, axis=1)
        scale = np.divide(np.sum(f * k, axis=1), kk, out=np.zeros_like(kk), where=kk > 0)
        best = min(best, float(np.sum((f - scale[:, None] * k) ** 2)) / energy)
    return best


def _dequantize(t: TensorStats) -> np.ndarray:
    v = t.values.astype(np.float64) - t.zero
    if t.scales is None or t.scales.size == 0:
        return v
    if t.scales.size == 1:
        return v * float(t.scales[0])
    shape = [1] * v.ndim
    shape[t.channel_axis] = -1
    return v * t.scales.reshape(shape)


def _gates(owner) -> int:
    """Gates a recurrent cell stacks along its kernels' last axis (LSTM 4, GRU 3), else 1."""
    import keras

    if isinstance(owner, keras.layers.LSTMCell):
        return 4
    if isinstance(owner, keras.layers.GRUCell):
        return 3
    return 1


def _match(w: np.ndarray, channel_axes, layer_name: str, tensors, used: set[int]):
    """The file tensor holding ``w`` (closest after a per-channel rescale), marked used."""
    best = None
    for i, t in enumerate(tensors):
        if i in used or t.size != w.size:
            continue
        for cand in _layouts(w, t.shape, channel_axes):
            err = _scaled_error(_dequantize(t), cand.astype(np.float64))
            bonus = 0 if t.layer == layer_name else 1
            key = (round(err, 3), bonus, err)  # values first, names break ties
            if best is None or key < best[0]:
                best = (key, i, t, cand)
    if best is not None:
        used.add(best[1])
    return best


def verify(path: str | os.PathLike, model, expect_int8: bool = True) -> list[WeightCheck]:
    """Check that the file keeps the model's structure; raise VerificationError if not.

    For every optimizable weight of ``model`` (wrapped models are stripped first): it is in the
    file; each zero of the Keras weight is a zero in the file; distinct values per tensor and
    per output channel did not grow; and (``expect_int8``) the file is fully integer.
    Returns the per-weight checks when all pass.
    """
    from collabopt.core import registry, structure
    from collabopt.core.rewrite import is_wrapped, iter_layers, strip

    report = inspect(path)
    if expect_int8 and not report.fully_integer:
        raise VerificationError(
            f"{path} is not a fully-int8 model (input {report.input_dtype}, float or custom "
            f"ops: {', '.join(report.non_integer_ops) or 'none'}). Export it with "
            "quantization='int8', or pass expect_int8=False to check structure only.")
    plain = strip(model) if is_wrapped(model) else model
    checks: list[WeightCheck] = []
    used: set[int] = set()
    for layer in iter_layers(plain):
        specs = registry.weight_specs(layer)
        if not specs:
            continue
        for spec in specs:
            w = registry.find_variable(layer, spec.name).numpy()
            st = structure.detect(w, spec.channel_axes)
            check = WeightCheck(layer.name, spec.name, False, st.sparsity, 0.0, 0, st.unique, 0,
                                st.unique_per_channel_max, 0)
            # a gated recurrent kernel may be in the file whole, or one tensor per gate
            options = [[w]]
            owner = registry.locate(layer, spec.name)[0]
            gates = _gates(owner)
            if gates > 1 and w.shape[-1] % gates == 0:
                options.append(np.split(w, gates, axis=-1))
                if gates == 3 and not getattr(owner, "reset_after", True):
                    # QAT's GRU(reset_after=False): update/reset columns | candidate columns
                    options.append(np.split(w, [2 * w.shape[-1] // 3], axis=-1))
            found = None
            for parts in options:
                taken = set(used)
                matches = [_match(part, spec.channel_axes, layer.name, report.tensors, taken)
                           for part in parts]
                if all(matches):
                    err = max(m[0][0] for m in matches)
                    if found is None or err < found[0]:
                        found = (err, matches, taken)
            if found is not None:
                _, matches, used = found
                check.found = True
                sizes = [m[2].size for m in matches]
                check.file_sparsity = float(np.average([m[2].sparsity for m in matches],
                                                       weights=sizes))
                check.zeros_lost = sum(int(np.count_nonzero((cand == 0) & (t.values != t.zero)))
                                       for _, _, t, cand in matches)
                check.file_unique = max(t.unique for _, _, t, _ in matches)
                check.file_unique_per_channel_max = max(t.unique_per_channel_max
                                                        for _, _, t, _ in matches)
            checks.append(check)
    broken = [c for c in checks if c.problems]
    if broken:
        rows = "\n".join(f"  {c.layer}.{c.weight}: " + "; ".join(c.problems) for c in broken)
        raise VerificationError(
            f"{path}: structure of {len(broken)} weight(s) did not survive conversion:\n{rows}\n"
            "Typical causes: batch norm folded by the converter after per-tensor clustering "
            "(call collabopt.fold_batchnorm before clustering) or per-channel weight scales "
            "on a per-tensor codebook (export with per_channel_weights=False).")
    return checks


# --- evaluate ------------------------------------------------------------------------------
def predict_tflite(path: str | os.PathLike, x: np.ndarray, batch_size: int = 64,
                   num_threads: int | None = None, verbose: bool | None = None
                   ) -> np.ndarray | list[np.ndarray]:
    """The ``.tflite`` model's outputs on ``x`` (LiteRT interpreter), dequantized to float;
    for a model with several outputs a list, in the Keras model's order (the file's own
    tensor order differs: it is taken from the export signature's output names).

    Inputs are quantized with the file's own input scale (int8 models take float data);
    batches run when the file allows resizing its batch dimension, else one sample at a time.
    Compare with the Keras model's ``predict`` to see what conversion changed.
    """
    batches = list(_tflite_batches(path, x, batch_size, num_threads, verbose))
    if isinstance(batches[0], list):
        return [np.concatenate([b[i] for b in batches]) for i in range(len(batches[0]))]
    return np.concatenate(batches)


def evaluate_tflite(path: str | os.PathLike, x: np.ndarray, y: np.ndarray,
                    batch_size: int = 64, num_threads: int | None = None,
                    verbose: bool | None = None) -> float:
    """Top-1 accuracy of the ``.tflite`` model on ``(x, y)`` (see :func:`predict_tflite`)."""
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    correct, start = 0, 0
    for out in _tflite_batches(path, x, batch_size, num_threads, verbose):
        if isinstance(out, list):
            raise ValueError(f"{path} has {len(out)} outputs: top-1 of which? Score "
                             "predict_tflite(path, x) with your metric instead")
        n = len(out)
        correct += int(np.sum(np.argmax(out.reshape(n, -1), axis=1) == y[start:start + n]))
        start += n
    return correct / len(y)


def _tflite_batches(path, x, batch_size, num_threads, verbose):
    x = np.asarray(x)
    interpreter = _interpreter(path, num_threads)  # clear error for a missing or damaged file
    inp = interpreter.get_input_details()[0]
    if tuple(inp["shape"][1:]) != tuple(x.shape[1:]):
        raise ValueError(f"{path} expects inputs of shape {tuple(inp['shape'][1:])}, "
                         f"got samples of shape {x.shape[1:]}")
    order = _output_order(interpreter)
    batch = _try_batch(interpreter, batch_size)
    inp = interpreter.get_input_details()[0]
    details = {d["index"]: d for d in interpreter.get_output_details()}
    outs = [details[i] for i in order]
    verbose = len(x) >= 5000 if verbose is None else verbose
    progress = None
    if verbose:
        from keras.utils import Progbar

        progress = Progbar(len(x), unit_name="sample")
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        interpreter.set_tensor(inp["index"], _quantize_input(chunk, inp))
        interpreter.invoke()
        values = [_dequantize_output(interpreter.get_tensor(o["index"])[:n], o) for o in outs]
        if progress is not None:
            progress.update(min(start + batch, len(x)))
        yield values if len(values) > 1 else values[0]


def _output_order(interpreter) -> list[int]:
    """Output tensor indices in the Keras model's order: the export signature names them
    output_0, output_1, ... (dict keys: sorted, as Keras flattens them)."""
    details = interpreter.get_output_details()
    if len(details) < 2:
        return [d["index"] for d in details]
    try:
        named = interpreter.get_signature_runner().get_output_details()
    except (ValueError, RuntimeError, KeyError):  # no signature: the file's own order
        return [d["index"] for d in details]
    return [named[n]["index"] for n in sorted(named, key=lambda n: (len(n), n))]


def _dequantize_output(values: np.ndarray, detail) -> np.ndarray:
    scale, zero = detail["quantization"]
    if detail["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return (values.astype(np.float32) - zero) * np.float32(scale)
    return values


def _quantize_input(x: np.ndarray, detail) -> np.ndarray:
    if detail["dtype"] in (np.int8, np.uint8):
        scale, zero = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        q = np.round(x.astype(np.float32) / scale + zero)
        return np.clip(q, info.min, info.max).astype(detail["dtype"])
    return x.astype(detail["dtype"])


def _try_batch(interpreter, batch_size: int) -> int:
    """Resize the batch dimension if the graph allows it (outputs must follow); else 1."""
    inp = interpreter.get_input_details()[0]
    out_shape = tuple(interpreter.get_output_details()[0]["shape"])
    if batch_size > 1:
        try:
            interpreter.resize_tensor_input(inp["index"], [batch_size, *inp["shape"][1:]])
            interpreter.allocate_tensors()
            probe = np.zeros([batch_size, *inp["shape"][1:]], dtype=inp["dtype"])
            interpreter.set_tensor(inp["index"], probe)
            interpreter.invoke()
            got = interpreter.get_output_details()[0]["shape"]
            if got[0] == batch_size and tuple(got[1:]) == out_shape[1:]:
                return batch_size
        except (RuntimeError, ValueError):
            pass
        interpreter.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    return 1


# XNNPACK, LiteRT's default CPU delegate, takes conv / depthwise / fully-connected ops only
# when input_scale * weight_scale / output_scale < 256; on a file holding such an op,
# LiteRT 2.21 aborts the whole process in allocate_tensors ("free(): double free", measured
# on a random-weight EfficientNetV2B0 PCQAT file whose ranges had collapsed), though its
# builtin kernels compute the op. Such files run on the builtin kernels here.
XNNPACK_MAX_REQUANTIZATION = 256.0
_REQUANTIZED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV",
                "CONV_3D")


def xnnpack_rejected_ops(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """(operator, Keras layer, requantization scale) of every int8 op XNNPACK cannot run."""
    _, model = _load(path)
    op_name, graph = _op_namer(), model.subgraphs[0]

    def scales(i):
        q = graph.tensors[i].quantization if i >= 0 else None
        return None if q is None or q.scale is None or len(q.scale) == 0 \
            else np.asarray(q.scale, np.float64)

    rejected = []
    for op in graph.operators or []:
        name = op_name(model.operatorCodes[op.opcodeIndex])
        if name not in _REQUANTIZED or len(op.inputs) < 2:
            continue
        # TRANSPOSE_CONV takes (output shape, weights, input)
        x, w = (op.inputs[2], op.inputs[1]) if name == "TRANSPOSE_CONV" else op.inputs[:2]
        sx, sw, so = scales(x), scales(w), scales(op.outputs[0])
        if sx is None or sw is None or so is None:
            continue
        ratio = float(np.max(sx[0] * sw / so[0]))
        if ratio >= XNNPACK_MAX_REQUANTIZATION:
            out = graph.tensors[op.outputs[0]].name.decode(errors="replace")
            rejected.append((name, _layer_name(out), ratio))
    return rejected


def _interpreter(path, num_threads: int | None):
    """A LiteRT interpreter for ``path``: XNNPACK unless the file holds an op it rejects."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO
    if xnnpack_rejected_ops(path):
        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(model_path=str(path), num_threads=num_threads or os.cpu_count(),
                       experimental_op_resolver_type=resolver)


def latency_ms(path: str | os.PathLike, runs: int = 50, num_threads: int = 1) -> float:
    """Median batch-1 inference time in milliseconds with the LiteRT interpreter."""
    import time

    interpreter = _interpreter(path, num_threads)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    interpreter.set_tensor(inp["index"], np.zeros(inp["shape"], dtype=inp["dtype"]))
    for _ in range(3):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))
