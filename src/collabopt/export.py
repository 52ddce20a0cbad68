"""TFLite (LiteRT) conversion: full-integer int8, dynamic-range, or float.

The model goes through a SavedModel and ``TFLiteConverter.from_saved_model`` (the route
that accepts every converter option). A QAT model is exported with only its fake-quant
transforms and learned activation ranges left in the graph, so the converter takes its
scales from training; a plain model needs representative data to calibrate. The file is
written atomically: a failure never leaves a half-written model behind.

The converter runs in a child process (one, started on first use and reused): on some
models its calibrator dies of a segfault (Keras 3 LSTM/GRU measured), and that must become
an ``ExportError`` with the converter's last words, not the end of the user's process.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

QUANTIZATIONS = ("int8", "dynamic", "float")


class ExportError(RuntimeError):
    """The converter could not produce the requested file; the message says why and what to do.

    ``operators``: for an int8 file left with non-integer ops, each (op, Keras layer).
    """

    def __init__(self, message: str, operators: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.operators = operators


def _is_qat(model) -> bool:
    from collabopt.core.rewrite import iter_layers
    from collabopt.core.wrapper import OptimizedLayer

    return any(isinstance(layer, OptimizedLayer)
               and (layer.quantize_output or layer.quantize_input
                    or any(t.kept_at_export for t in layer.transforms))
               for layer in iter_layers(model))


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a folder")


def _calibration(model, data, max_samples: int):
    """Representative-data generator after checking shape and dtype against the model."""
    if isinstance(data, np.ndarray):
        arrays = [data]
    elif isinstance(data, (list, tuple)) and all(isinstance(a, np.ndarray) for a in data):
        arrays = list(data)
    else:
        raise TypeError("representative_data must be a numpy array (or a list of arrays, one "
                        f"per model input), got {type(data).__name__}")
    inputs = model.inputs if getattr(model, "inputs", None) else None
    if inputs is not None:
        if len(arrays) != len(inputs):
            raise ValueError(f"representative_data has {len(arrays)} array(s) but the model has "
                             f"{len(inputs)} input(s)")
        for a, t in zip(arrays, inputs, strict=True):
            want = tuple(t.shape[1:])
            if tuple(a.shape[1:]) != want:
                raise ValueError(f"representative_data samples have shape {a.shape[1:]}, the "
                                 f"model input expects {want} (arrays are (N, *shape))")
    dtypes = [_input_dtype(t) for t in inputs] if inputs is not None else [None] * len(arrays)
    for a, dtype in zip(arrays, dtypes, strict=True):
        integer_input = dtype is not None and np.issubdtype(dtype, np.integer)
        if integer_input and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"representative_data must hold integers for an {dtype} input "
                             f"(token ids, say), got dtype {a.dtype}")
        if not integer_input and not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"representative_data must be float (the model's float input, "
                             f"before quantization), got dtype {a.dtype}")
        if a.shape[0] == 0:
            raise ValueError("representative_data is empty")
    n = min(a.shape[0] for a in arrays)
    take = np.linspace(0, n - 1, min(n, max_samples)).astype(int)
    # the samples themselves, in the model's own input dtypes: they travel to the converter
    return [a[take].astype(dtype or np.float32) for a, dtype in zip(arrays, dtypes,
                                                                     strict=True)]


def _input_dtype(tensor) -> np.dtype:
    import keras

    return np.dtype(keras.backend.standardize_dtype(tensor.dtype))


def _input_signature(model):
    import tensorflow as tf

    if not getattr(model, "inputs", None):
        return None
    return [tf.TensorSpec((1, *t.shape[1:]), tf.as_dtype(_input_dtype(t)))
            for t in model.inputs]


@contextlib.contextmanager
def _unrolled(model):
    """Export every recurrent layer unrolled over its (fixed) sequence length.

    Keras 3 runs LSTM / GRU / SimpleRNN as a while loop over a TensorList, which the
    converter cannot size ("TensorListReserve ... element_shape to be static") and whose
    int8 calibration segfaults. Unrolled, a fixed-length sequence is plain FULLY_CONNECTED,
    ADD, MUL, LOGISTIC and TANH ops per step, each with an int8 kernel (TFLite's fused
    UNIDIRECTIONAL_SEQUENCE_LSTM is only emitted for tf.keras 2 layers). The layers are
    switched back once the SavedModel is written.
    """
    import keras

    from collabopt.core.registry import sublayers
    from collabopt.core.rewrite import iter_layers

    found, stack, seen = [], list(iter_layers(model)), set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.RNN) and not layer.unroll:
            found.append(layer)
        stack.extend(sub for _, sub in sublayers(layer))
    # one matmul per gate (implementation 1), so the quantizer sees no SPLIT of the gate
    # activations: it left one in float in 3 of ~25 measured exports with the fused matmul
    # (PTQ and PQAT alike); each gate also gets its own int8 scale. ``verify`` pairs the
    # gate tensors with the kernel. (LSTM on 8x8 digits, same class as Keras: PTQ 97.8 %,
    # cluster -> PTQ 99.7 %, PQAT 91.9 %, CQAT 97.2 %, PCQAT 95.8 %.) QAT models do not get
    # here: their recurrent layers run unrolled with a range on every tensor
    # (core/lowerings.py), one fused matmul per step.
    cells = [(layer.cell, layer.cell.implementation) for layer in found
             if hasattr(layer.cell, "implementation")]
    for layer in found:
        layer.unroll = True
    for cell, _ in cells:
        cell.implementation = 1
    try:
        yield
    except ValueError as err:
        if found and "unroll" in str(err).lower():
            raise ExportError(
                f"recurrent layer(s) {[layer.name for layer in found]} are exported unrolled, "
                "which needs a fixed sequence length: build the model with keras.Input("
                "(timesteps, features)), not (None, features)") from err
        raise
    finally:
        for layer in found:
            layer.unroll = False
        for cell, implementation in cells:
            cell.implementation = implementation


def _fully_integer(flatbuffer: bytes, folder: str) -> bool:
    from collabopt.inspection import inspect as inspect_file

    probe = Path(folder) / "probe.tflite"
    probe.write_bytes(flatbuffer)
    return not inspect_file(probe).non_integer_ops


def _codebooks_per_tensor(model) -> tuple[bool, bool]:
    """Whether a per-tensor codebook sits in a kernel that post-training conversion would
    scale per channel: (a conv-like one, a Dense-like one)."""
    from collabopt.core import registry, structure
    from collabopt.core.rewrite import iter_layers

    conv = dense = False
    for layer in iter_layers(model):
        for spec in registry.weight_specs(layer) or ():
            w = registry.find_variable(layer, spec.name).numpy()
            if structure.detect(w, spec.channel_axes).clustered_per_tensor:
                conv |= spec.int8_per_channel
                dense |= not spec.int8_per_channel
    return conv, dense


def _shorten_tensor_names(flatbuffer: bytes) -> bytes:
    import flatbuffers
    from ai_edge_litert.tools import flatbuffer_utils

    from collabopt.inspection import kernel_op_name

    class Aligned16(flatbuffers.Builder):
        """Byte arrays (weight buffers) start on 16 bytes, as the schema asks (force_align:
        16): runtimes read weights in place. (The converter's own files miss it for most
        buffers; a plain re-pack would too.)"""

        _byte_array = False

        def CreateNumpyVector(self, x):  # noqa: N802 - flatbuffers' name
            self._byte_array = x.dtype == np.uint8
            try:
                return super().CreateNumpyVector(x)
            finally:
                self._byte_array = False

        def StartVector(self, elemSize, numElems, alignment):  # noqa: N802, N803
            return super().StartVector(elemSize, numElems,
                                       max(alignment, 16) if self._byte_array else alignment)

    model = flatbuffer_utils.read_model_from_bytearray(flatbuffer)
    for graph in model.subgraphs:
        keep = set(graph.inputs) | set(graph.outputs)  # signatures and users refer to these
        for i, tensor in enumerate(graph.tensors):
            if i not in keep and tensor.name:
                tensor.name = kernel_op_name(tensor.name.decode(errors="replace")).encode()
    for buffer in model.buffers:
        if buffer.data is not None and not isinstance(buffer.data, np.ndarray):
            buffer.data = np.frombuffer(bytes(buffer.data), np.uint8)
    builder = Aligned16(len(flatbuffer))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def export_tflite(
    model,
    path: str | os.PathLike,
    representative_data: np.ndarray | Iterable[np.ndarray] | None = None,
    quantization: str = "int8",
    per_channel_weights: bool | None = None,
    max_calibration_samples: int = 300,
    short_tensor_names: bool = True,
) -> Path:
    """Convert ``model`` (wrapped or plain) to a ``.tflite`` file at ``path`` (batch size 1).

    ``quantization="int8"``: int8 weights, activations, input and output, builtin ops only.
    Post-training int8 needs ``representative_data``; a QAT model uses its learned ranges,
    and ``representative_data`` only where they leave a tensor float.
    Weight scales of post-training int8: ``per_channel_weights=None`` (default) keeps every
    codebook it finds: one scale per tensor for all weights when a conv kernel holds a
    per-tensor codebook (the converter's switch is global), per channel otherwise; a Dense
    kernel with a per-tensor codebook (``co.cluster(per_channel="auto")``) gets one scale in
    either case, as QAT gives it. ``True`` / ``False`` force per channel / per tensor.

    ``short_tensor_names``: the converter names a fused tensor after every op folded into it
    ("m/relu/Relu;m/bn/batchnorm/add_1;m/conv/convolution;..."), 3-4 % of a small int8 file.
    Each is cut to the piece naming its layer's op ("conv/convolution"), which is what a
    viewer or ``collabopt.inspect`` needs; input and output names are kept.
    """
    from collabopt.core import lowerings
    from collabopt.core.rewrite import ensure_built, is_wrapped, iter_layers, strip

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    path = Path(path)
    _check_writable(path)
    ensure_built(model)
    qat = _is_qat(model)
    plain = strip(model, keep_quantization=qat and quantization == "int8") \
        if is_wrapped(model) else model
    samples = None
    if quantization == "int8":
        if representative_data is not None:
            samples = _calibration(plain, representative_data, max_calibration_samples)
        elif not qat:
            raise ValueError(
                "post-training int8 export needs representative_data: a few hundred float "
                "input samples, e.g. x_train[:300] (or quantize the model with "
                "collabopt.quantize first, whose learned ranges need none)")

    with tempfile.TemporaryDirectory(prefix="collabopt-export-") as tmp:
        saved = os.path.join(tmp, "saved_model")
        with _unrolled(plain), lowerings.export_form(iter_layers(plain)):
            plain.export(saved, format="tf_saved_model", verbose=False,
                         input_signature=_input_signature(plain))
        options = {"quantization": quantization, "qat": qat,
                   "float_input": all(np.issubdtype(_input_dtype(t), np.floating)
                                      for t in getattr(plain, "inputs", None) or ()),
                   "per_channel": True, "dense_per_tensor": False}
        if quantization == "int8":
            conv_codebook, dense_codebook = _codebooks_per_tensor(plain)
            options["per_channel"] = (not conv_codebook if per_channel_weights is None
                                      else per_channel_weights)
            # post-training conversion scales FULLY_CONNECTED weights per channel, which
            # would multiply a Dense codebook's values (a recurrent kernel's too, under QAT:
            # each step's matmul reads it); convs stay per channel
            options["dense_per_tensor"] = dense_codebook
        if qat and quantization == "int8":
            # the model's own ranges first, conv scales as its fake-quant set them: with
            # calibration (and its per-tensor switch) the converter re-scaled an LSTM's
            # kernels (codebook 8 -> 25 values); calibration only fills in missing ranges
            flatbuffer = _converter.convert(saved, {**options, "per_channel": True}, None,
                                            plain.name)
            if samples is not None and not _fully_integer(flatbuffer, tmp):
                flatbuffer = _converter.convert(saved, options, samples, plain.name)
        else:
            flatbuffer = _converter.convert(saved, options, samples, plain.name)
        if short_tensor_names:
            flatbuffer = _shorten_tensor_names(flatbuffer)
        fd, partial = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial",
                                       dir=path.parent if str(path.parent) else ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(flatbuffer)
            os.replace(partial, path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
    if quantization == "int8":
        from collabopt.inspection import inspect as inspect_file
        from collabopt.inspection import non_integer_operators

        if inspect_file(path).non_integer_ops:
            bad = non_integer_operators(path)
            os.remove(path)
            raise ExportError(_float_ops_message(plain.name, bad, qat and samples is None), bad)
        _warn_xnnpack(path, plain.name)
    return path


def _warn_xnnpack(path: Path, model_name: str) -> None:
    """Warn when LiteRT's default delegate cannot run the file (see xnnpack_rejected_ops)."""
    import warnings

    from collabopt.inspection import XNNPACK_MAX_REQUANTIZATION, xnnpack_rejected_ops

    rejected = xnnpack_rejected_ops(path)
    if rejected:
        ops = ", ".join(f"{op} of layer {layer!r} ({ratio:.0f})" for op, layer, ratio in rejected)
        warnings.warn(
            f"{path}: XNNPACK, LiteRT's default CPU delegate, rejects {ops}: input scale x "
            f"weight scale / output scale is >= {XNNPACK_MAX_REQUANTIZATION:.0f}, and LiteRT "
            "then fails or aborts the process allocating the file. The builtin kernels run it "
            "(collabopt.predict_tflite does so); on a device, disable XNNPACK for this file, "
            "or retrain: the layer's output range is far narrower than its input's, a sign "
            "of collapsed activation ranges (an untrained or diverged model).",
            RuntimeWarning, stacklevel=3)


def check_int8(model, representative_data=None) -> list[tuple[str, str]]:
    """(op, Keras layer) for every op of ``model`` that a fully-int8 TFLite file cannot hold;
    empty when it deploys. Call it before spending training time: it converts the model
    post-training (seconds), calibrated on ``representative_data`` or, without it, on random
    inputs of the model's shapes (zeros for integer inputs such as token ids)."""
    from collabopt.core.rewrite import ensure_built

    ensure_built(model)
    if representative_data is None:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise ValueError("check_int8 of a subclassed model needs representative_data")
        if any(None in tuple(t.shape[1:]) for t in inputs):
            raise ValueError("check_int8 needs fixed input shapes (keras.Input((h, w, c)), not "
                             "None) or representative_data")
        rng = np.random.default_rng(0)
        representative_data = [
            np.zeros((8, *t.shape[1:]), _input_dtype(t))
            if np.issubdtype(_input_dtype(t), np.integer)
            else rng.normal(size=(8, *t.shape[1:])).astype(_input_dtype(t)) for t in inputs]
    with tempfile.TemporaryDirectory(prefix="collabopt-check-") as tmp:
        try:
            export_tflite(model, Path(tmp) / "check.tflite",
                          representative_data=representative_data)
        except ExportError as err:
            if err.operators is None:
                raise
            return err.operators
    return []


def _float_ops_message(model_name: str, bad: list[tuple[str, str]], uncalibrated_qat: bool
                       ) -> str:
    by_layer: dict[str, list[str]] = {}
    for op, layer in bad:
        by_layer.setdefault(layer, [])
        if op not in by_layer[layer]:
            by_layer[layer].append(op)
    where = "; ".join(f"{', '.join(ops)} from layer {layer!r}" for layer, ops in by_layer.items())
    fix = ("These tensors have no QAT range (ops inside a layer's own call, say): pass "
           "representative_data, e.g. x_train[:300], to calibrate them."
           if uncalibrated_qat else
           "TFLite has no int8 kernel for these ops: replace those layers, leave them out of "
           "the model, or export with quantization='dynamic' or 'float'.")
    return f"int8 export of {model_name!r} left non-integer ops: {where}. {fix}"


# --- the converter, in a child process -------------------------------------------------------
def convert_saved_model(saved: str, options: dict, samples: list[np.ndarray] | None) -> bytes:
    """``TFLiteConverter.from_saved_model`` with our options (runs in the converter child)."""
    import tensorflow as tf

    os.ftruncate(2, 0)  # stderr is this job's log: the parent reads it after a crash
    os.lseek(2, 0, os.SEEK_SET)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    quantization = options["quantization"]
    if quantization in ("int8", "dynamic"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "int8":
        if samples is not None:
            def gen():
                for i in range(len(samples[0])):
                    yield [a[i:i + 1] for a in samples]

            converter.representative_dataset = gen
        if not options["qat"]:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if options["float_input"]:  # integer inputs (token ids) stay what they are
            converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
        if not options["per_channel"]:
            converter._experimental_disable_per_channel = True
        elif options["dense_per_tensor"]:
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    return converter.convert()


class _Converter:
    """One converter process (``python -m collabopt.export``), reused, replaced after a crash.

    Jobs go over its stdin and answers come back on its stdout, pickled; its stderr is a log
    file, so the last words of a crash (faulthandler's frames) can be quoted.
    """

    def __init__(self):
        self._proc = None
        self._log = None

    def convert(self, saved: str, options: dict, samples, model_name: str) -> bytes:
        import pickle

        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            _send(self._proc.stdin, (saved, options, samples))
            status, value = pickle.loads(_receive(self._proc.stdout))
        except (EOFError, OSError) as err:  # the process died mid-job
            code = self._proc.wait()
            self._proc = None
            raise ExportError(
                f"the TFLite converter crashed converting model {model_name!r} "
                f"({options['quantization']}; {_signal_name(code)}); your process is fine and "
                f"a fresh converter serves the next export. Its last words: "
                f"{self._last_words()}.") from err
        if status == "ok":
            return value
        raise ExportError(
            f"TFLite conversion ({options['quantization']}) of model {model_name!r} failed: "
            f"{value}. Full-integer int8 needs every op to have an int8 builtin kernel; use "
            "quantization='dynamic' or 'float' for models that do not.")

    def _start(self):
        import subprocess
        import sys

        if self._log is None:
            fd, self._log = tempfile.mkstemp(prefix="collabopt-converter-", suffix=".log")
            os.close(fd)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-m", "collabopt.export"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)

    def _last_words(self) -> str:
        try:
            lines = [ln.strip() for ln in Path(self._log).read_text(errors="replace")
                     .splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        fatal = [i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")]
        if fatal:  # faulthandler: the signal and the innermost Python frames
            where = [ln for ln in lines[fatal[-1]:] if ln.startswith("File ")][:2]
            return " | ".join([lines[fatal[-1]], *where])
        return " | ".join(lines[-3:]) or "(nothing)"


def _signal_name(code: int) -> str:
    import signal

    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit status {code}"


def _send(stream, obj) -> None:
    import pickle

    data = pickle.dumps(obj, protocol=5)
    stream.write(len(data).to_bytes(8, "little") + data)
    stream.flush()


def _receive(stream) -> bytes:
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("converter process closed its output")
    n = int.from_bytes(head, "little")
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("converter process closed its output")
    return data


def _gist(text: str) -> str:
    """The line of a converter error that says what failed (MLIR's "error:" line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
    return errors[0] if errors else (lines[-1] if lines else "")


def _serve() -> None:
    """The converter process: one job per message until stdin closes."""
    import pickle
    import sys

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to the log, not into the protocol
    while True:
        try:
            saved, options, samples = pickle.loads(_receive(stdin))
        except EOFError:
            return
        try:
            answer = ("ok", convert_saved_model(saved, options, samples))
        except Exception as err:  # noqa: BLE001 - sent back, raised there as ExportError
            answer = ("error", _gist(str(err)) or repr(err))
        _send(stdout, answer)


_converter = _Converter()

if __name__ == "__main__":
    _serve()
