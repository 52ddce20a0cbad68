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
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Targets:
    """What a deployable leaf must meet; None means "no limit"."""

    max_accuracy_drop: float | None = None  # in accuracy points (0.01 = 1 %) below FP32 base
    max_zip_bytes: int | None = None
    max_latency_ms: float | None = None
    max_vela_cycles: int | None = None
    max_arena_bytes: int | None = None  # TFLite Micro tensor arena, measured (extra [micro])
    max_flash_bytes: int | None = None  # the model data in flash
    max_sram_bytes: int | None = None  # Ethos-U SRAM, from Vela (extra [vela])

    def failures(self, row: dict, base_accuracy: float) -> list[str]:
        out = []
        if self.max_accuracy_drop is not None and (
                base_accuracy - row["int8_accuracy"] > self.max_accuracy_drop + 1e-12):
            out.append("accuracy")
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
    """A trained model: ``op`` applied to ``parent`` and fine-tuned."""

    name: str
    parent: str | None
    op: str  # "base", "prune", "cluster", "cluster_pc", "qat"


@dataclass(frozen=True)
class Leaf:
    name: str
    node: str
    level: int
    quantization: str  # "ptq" or "qat"


def _plan(per_channel: bool) -> tuple[list[Node], list[Leaf]]:
    nodes = [Node("base", None, "base"), Node("prune", "base", "prune"),
             Node("cluster", "base", "cluster"), Node("prune_cluster", "prune", "cluster"),
             Node("qat", "base", "qat"), Node("pqat", "prune", "qat"),
             Node("cqat", "cluster", "qat"), Node("pcqat", "prune_cluster", "qat")]
    leaves = [Leaf("PTQ", "base", 1, "ptq"), Leaf("QAT", "qat", 1, "qat"),
              Leaf("prune → PTQ", "prune", 1, "ptq"), Leaf("cluster → PTQ", "cluster", 1, "ptq"),
              Leaf("PQAT", "pqat", 2, "qat"),
              Leaf("prune → cluster → PTQ", "prune_cluster", 2, "ptq"),
              Leaf("CQAT", "cqat", 2, "qat"), Leaf("PCQAT", "pcqat", 3, "qat")]
    if per_channel:
        nodes += [Node("cluster_pc", "base", "cluster_pc"),
                  Node("prune_cluster_pc", "prune", "cluster_pc"),
                  Node("cqat_pc", "cluster_pc", "qat"), Node("pcqat_pc", "prune_cluster_pc", "qat")]
        leaves += [Leaf("cluster(pc) → PTQ", "cluster_pc", 1, "ptq"),
                   Leaf("CQAT(pc)", "cqat_pc", 2, "qat"),
                   Leaf("prune → cluster(pc) → PTQ", "prune_cluster_pc", 2, "ptq"),
                   Leaf("PCQAT(pc)", "pcqat_pc", 3, "qat")]
    return nodes, leaves


def leaf_names(per_channel: bool = True) -> list[str]:
    return [leaf.name for leaf in _plan(per_channel)[1]]


# --- data ---------------------------------------------------------------------------------
def _as_arrays(data, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) numpy arrays from a tuple, a tf.data.Dataset or a keras PyDataset."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x, y = data
        return (x, y) if limit is None else (x[:limit], y[:limit])
    xs, ys, n = [], [], 0
    iterator = data if not hasattr(data, "__getitem__") or hasattr(data, "take") else (
        data[i] for i in range(len(data)))
    for batch in iterator:
        bx, by = batch[0], batch[1]
        xs.append(np.asarray(bx))
        ys.append(np.asarray(by))
        n += len(xs[-1])
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError("the data set is empty")
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def _calibration_inputs(data, n: int) -> np.ndarray:
    """``n`` inputs evenly spaced through array data, so data sorted by class still calibrates
    on every class (tfmot's benchmarks sample the same way); the first ``n`` of a dataset,
    which is expected to be shuffled."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], np.ndarray):
        x = data[0]
        return x[np.unique(np.linspace(0, len(x) - 1, min(n, len(x))).astype(int))]
    return _as_arrays(data, limit=n)[0]


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

    def table(self) -> list[dict]:
        """One row per leaf, the columns of the reference guide's table."""
        return [dict(r) for r in self.rows]

    def __str__(self) -> str:
        from collabopt.report import format_table

        return format_table(self.rows, self.baseline)


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
    """

    def __init__(self, model, train, val, compile: Callable | dict | None = None,
                 fit: dict | None = None, sparsity: float = 0.5, clusters: int = 16,
                 per_channel: bool = False, targets: Targets | None = None,
                 calibration_samples: int = 300, latency_runs: int = 50,
                 vela_accelerator: str | None = "ethos-u55-128",
                 qat_compile: Callable | dict | None = None, prune_layers=None,
                 cluster_layers=None, batchnorm: str = "keep", seed: int | None = 0,
                 bias_correction: bool = True):
        from collabopt.core.rewrite import ensure_built
        from collabopt.quantization import BATCHNORM

        ensure_built(model)
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        if not isinstance(clusters, int) or clusters < 3:
            raise ValueError(f"clusters must be an int >= 3, got {clusters!r}")
        if batchnorm not in BATCHNORM:
            raise ValueError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.batchnorm, self.seed = batchnorm, seed
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
        self.targets = targets or Targets()
        self.calibration_samples = calibration_samples
        self.latency_runs = latency_runs
        self.vela_accelerator = vela_accelerator
        self.nodes, self.leaves = _plan(per_channel)

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
                "bias_correction": self.bias_correction}

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

    def _prune_schedule(self):
        """Zhu & Gupta ramp over the first 2/3 of fine-tuning, then a third to recover.

        One-shot pruning of a deep model to a high sparsity (75 % of DS-CNN-L) destroyed it
        beyond what a short fine-tune recovers; the gradual ramp is what the reference uses.
        """
        from collabopt.pruning import PolynomialDecay

        per_epoch = self.fit.get("steps_per_epoch") or _steps_per_epoch(
            self.train, self.fit.get("batch_size", 32))
        steps = int(per_epoch) * int(self.fit.get("epochs", 1))
        end = max(1, (2 * steps) // 3)
        return PolynomialDecay(0.0, self.sparsity, begin_step=0, end_step=end,
                               frequency=max(1, end // 16))

    def _train(self, node: Node, parent_model, log):
        import keras

        import collabopt as co
        from collabopt.quantization import fold_batchnorm, fold_batchnorm_behind_per_tensor

        if self.seed is not None:
            keras.utils.set_random_seed(self.seed)

        folded = None  # the uncompressed, batch-norm-folded parent of a cluster node
        if node.op == "prune":  # before BN folding: batch norm helps the model recover
            model = co.prune(parent_model, self._prune_schedule(), layers=self.prune_layers,
                             verbose=False)
        elif node.op == "cluster":
            # BN folded first, so the converter cannot rescale the shared values per channel
            folded = fold_batchnorm(parent_model)
            model = co.cluster(folded, self.clusters, layers=self.cluster_layers,
                               verbose=False)
        elif node.op == "cluster_pc":
            # per channel where the file scales per channel: those codebooks survive the
            # converter's BN fold, so there BN may keep training; Dense kernels (one scale)
            # get one codebook, as in the per-tensor node
            if self.batchnorm == "keep":  # batch norm re-estimates the means itself
                parent = fold_batchnorm_behind_per_tensor(parent_model)
            else:
                parent = folded = fold_batchnorm(parent_model)
            model = co.cluster(parent, self.clusters, per_channel="auto",
                               layers=self.cluster_layers, verbose=False)
        elif node.op == "qat":
            model = co.quantize(parent_model, batchnorm=self.batchnorm, verbose=False)
        else:
            raise AssertionError(node.op)
        self._compile(model, self.qat_compile if node.op == "qat" else self.compile)
        model.fit(**_fit_args(self.train), **self.fit)
        if folded is not None and self.bias_correction:
            co.correct_bias(model, folded,
                            _calibration_inputs(self.train, self.calibration_samples))
        return model

    def _train_and_store(self, node: Node, parent_model, out: Path, log):
        """Train ``node`` and checkpoint it atomically: a QAT model as it is, others stripped."""
        import collabopt as co

        model = self._train(node, parent_model, log)
        stored = model if node.op == "qat" else co.strip(model)
        _atomic_save(stored, out / "nodes" / f"{node.name}.keras")
        return stored

    # -- exploring --
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

        def float_accuracy(name: str) -> float:
            file = out / "nodes" / f"{name}.accuracy.json"
            if file.exists():
                return json.loads(file.read_text())["accuracy"]
            acc = _keras_accuracy(node_model(name), x_val, y_val)
            _atomic_json(file, {"accuracy": acc})
            return acc

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
            file_pred = _classes(file_out)
            try:
                verify(path, model)
                verified = "yes"
            except co.VerificationError as err:
                lines = str(err).splitlines()  # the first failed check, else the message
                verified = "no: " + (lines[1] if len(lines) > 1 else lines[0]).strip()
            row = {
                "path": leaf.name, "level": level, "node": leaf.node,
                "fp32_accuracy": float_accuracy(
                    leaf.node if leaf.quantization == "ptq"
                    else _float_parent(self.nodes, leaf.node)),
                "keras_accuracy": float_accuracy(leaf.node),  # the exported model
                "int8_accuracy": _top1(file_pred, y_val),
                # conversion fidelity, finer than an accuracy difference (flips in both
                # directions cancel there)
                "agreement": float(np.mean(file_pred == _classes(keras_out))),
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
            log(f"[tree] level {level} · {leaf.name}: int8 accuracy "
                f"{row['int8_accuracy']:.4f} (same class as Keras on "
                f"{row['agreement']:.2%}), {row['zip_bytes']:,} bytes zipped, "
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
            baseline = {"path": "FP32 baseline", "fp32_accuracy": float_accuracy("base"),
                        "int8_accuracy": None, "size_bytes": rep.size_bytes,
                        "zip_bytes": rep.zip_bytes,
                        "latency_ms": latency_ms(base_file, runs=self.latency_runs)}
            _atomic_json(baseline_json, baseline)
        log(f"[tree] FP32 baseline: accuracy {baseline['fp32_accuracy']:.4f}, "
            f"{baseline['zip_bytes']:,} bytes zipped")

        rows: list[dict] = []
        failed: list[dict] = []
        if executor is not None and not stop_when_met:
            train_in_parallel([lf for lf in self.leaves if lf.name in wanted])
        for level in (1, 2, 3):
            level_rows = []
            level_leaves = [lf for lf in self.leaves if lf.level == level and lf.name in wanted]
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
                        f"(int8 accuracy {row['int8_accuracy']:.4f})")
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
                row["meets_targets"] = not self.targets.failures(row, baseline["fp32_accuracy"])
                level_rows.append(row)
            rows.extend(level_rows)
            if stop_when_met and any(r["meets_targets"] for r in level_rows):
                log(f"[tree] level {level} meets the targets: stopping here, as the guide "
                    "recommends")
                break
        recommended = _recommend(rows)
        result = ExploreResult(out, rows, baseline, recommended, self.targets, failed=failed)
        if failed:
            log(f"[tree] {len(failed)} leaf/leaves failed ({', '.join(f['path'] for f in failed)})"
                "; the report says why, and running the same exploration again retries them")
        from collabopt.report import write_report

        for name in ("base", "prune", "prune_cluster"):  # stages of the density plot
            if name == "base" or (out / "nodes" / f"{name}.keras").exists():
                node_model(name)
        write_report(result, density_sources=self._density_sources(trained, out))
        return result

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

    def _density_sources(self, trained, out: Path) -> dict:
        """Stages for the density plot of one representative kernel."""
        stages = {}
        for label, node in (("baseline", "base"), ("pruned", "prune"),
                            ("pruned + clustered", "prune_cluster")):
            if node in trained:
                stages[label] = trained[node]
        pcqat = out / "leaves" / f"{_slug('PCQAT')}.tflite"
        if pcqat.exists():
            stages["PCQAT int8 (file)"] = str(pcqat)
        return stages


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


def _classes(outputs) -> np.ndarray:
    outputs = np.asarray(outputs)
    return np.argmax(outputs.reshape(len(outputs), -1), axis=1)


def _relative_error(file_out, keras_out) -> float:
    """The file's largest output deviation from Keras, relative to the largest Keras output
    (0.01: within 1 % of the output range; meaningful where classes are not)."""
    file_out, keras_out = np.asarray(file_out, "float64"), np.asarray(keras_out, "float64")
    return float(np.abs(file_out - keras_out).max() / max(np.abs(keras_out).max(), 1e-12))


def _top1(classes: np.ndarray, y) -> float:
    return float(np.mean(classes == np.asarray(y).ravel()))


def _keras_accuracy(model, x, y) -> float:
    return _top1(_classes(model.predict(x, verbose=0, batch_size=256)), y)


def _slug(name: str) -> str:
    return (name.replace(" → ", "-").replace("(pc)", "_pc").replace(" ", "_").lower())


def _recommend(rows: list[dict]) -> str | None:
    meeting = [r for r in rows if r["meets_targets"]]
    if not meeting:
        return None
    best = min(meeting, key=lambda r: (r["zip_bytes"], -r["int8_accuracy"]))
    return best["path"]


__all__ = ["DeploymentTree", "Targets", "ExploreResult", "leaf_names"]
