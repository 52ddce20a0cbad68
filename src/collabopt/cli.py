"""The ``collabopt`` command: ``demo``, ``run CONFIG.toml``, ``inspect FILE.tflite``,
``export-c FILE.tflite``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import tomllib
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class ConfigError(ValueError):
    """A config file problem; the message names the offending key."""


# --- demo ---------------------------------------------------------------------------------
def demo(out: Path, quick: bool, force: bool, workers: int | None = None) -> int:
    import keras

    import collabopt as co
    from collabopt import datasets, models

    try:
        (x, y), (xt, yt) = datasets.mnist()
        name, shape = "MNIST", (28, 28, 1)
    except datasets.DataError as err:
        print(f"[demo] {err}\n[demo] falling back to scikit-learn's 8x8 digits")
        (x, y), (xt, yt) = datasets.digits()
        name, shape = "8x8 digits", (8, 8, 1)
    if quick:
        x, y, xt, yt = x[:6000], y[:6000], xt[:1000], yt[:1000]
    epochs, finetune = (2, 1) if quick else (3, 2)  # the default matches bench_tree.py
    out.mkdir(parents=True, exist_ok=True)

    def compile_fn(model, lr=1e-3):
        model.compile(keras.optimizers.Adam(lr),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    base_file = out / f"base_{'quick' if quick else 'full'}.keras"
    if base_file.exists() and not force:
        base = keras.models.load_model(base_file)
        print(f"[demo] using the trained {name} CNN cached in {base_file}")
    else:
        print(f"[demo] training the {name} CNN ({len(x):,} images, {epochs} epochs)")
        keras.utils.set_random_seed(0)
        base = models.mnist_cnn(shape)
        compile_fn(base)
        base.fit(x, y, epochs=epochs, batch_size=64, validation_split=0.1, verbose=2)
        tmp = base_file.with_name(base_file.stem + ".partial.keras")
        base.save(tmp)
        os.replace(tmp, base_file)
    tree = co.DeploymentTree(
        base, (x, y), (xt, yt), compile=lambda m: compile_fn(m, 3e-4),
        fit={"epochs": finetune, "batch_size": 64, "verbose": 2}, sparsity=0.5, clusters=16,
        per_channel=True, targets=co.Targets(max_accuracy_drop=0.01))
    start = time.perf_counter()
    with _executor(workers, None) as executor:
        result = tree.explore(out / ("tree_quick" if quick else "tree"), force=force,
                              executor=executor)
    print()
    print(result)
    print(f"\n[demo] recommended leaf: {result.recommended or 'none meets the targets'}")
    print(f"[demo] report: {result.report_md}  and  {result.report_html}")
    elapsed = time.perf_counter() - start
    print(f"[demo] .tflite files: {result.out_dir / 'leaves'}  ({elapsed:.0f}s)")
    return 0


# --- run CONFIG ---------------------------------------------------------------------------
_KEYS = {
    "model": {"path"},
    "data": {"npz", "loader"},
    "train": {"optimizer", "learning_rate", "qat_learning_rate", "loss", "from_logits",
              "epochs", "batch_size"},
    "tree": {"out_dir", "paths", "sparsity", "clusters", "per_channel", "stop_when_met",
             "prune_skip", "cluster_skip", "batchnorm", "seed", "bias_correction", "workers",
             "dask_scheduler", "metric", "higher_is_better", "layer_policy",
             "sensitivity_threshold", "distill", "distill_temperature", "distill_weight"},
    "targets": {"max_metric_drop", "max_accuracy_drop", "max_zip_bytes", "max_latency_ms",
                "max_vela_cycles", "max_arena_bytes", "max_flash_bytes", "max_sram_bytes"},
    "search": {"leaf", "trials", "sparsity", "clusters", "per_layer", "sampler", "seed"},
}


def load_config(path: Path) -> dict:
    """Read and validate a run config; every error names the file and the key."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from err
    for section, value in config.items():
        if section not in _KEYS:
            raise ConfigError(f"{path}: unknown section [{section}] (known: {sorted(_KEYS)})")
        for key in value:
            if key not in _KEYS[section]:
                raise ConfigError(f"{path}: [{section}].{key} is not a known key (known: "
                                  f"{sorted(_KEYS[section])})")
    for section in ("model", "data"):
        if section not in config:
            raise ConfigError(f"{path}: missing section [{section}]")
    model_path = config["model"].get("path")
    if not model_path:
        raise ConfigError(f"{path}: [model].path is required (a .keras file)")
    model_path = (path.parent / model_path).resolve()
    if not model_path.is_file():
        raise ConfigError(f"{path}: [model].path: {model_path} does not exist")
    if model_path.suffix != ".keras":
        raise ConfigError(f"{path}: [model].path: {model_path.name} is not a .keras file")
    config["model"]["path"] = model_path
    data = config["data"]
    if ("npz" in data) == ("loader" in data):
        raise ConfigError(f"{path}: [data] needs exactly one of npz = 'file.npz' or "
                          "loader = 'package.module:function'")
    from collabopt.tree import leaf_names

    tree = config.setdefault("tree", {})
    paths = tree.get("paths", "all")
    try:  # one value or a list of them: sparsities in (0, 1), cluster counts >= 3
        names = leaf_names(per_channel=True, sparsity=tree.get("sparsity", 0.5),
                           clusters=tree.get("clusters", 16))
    except ValueError as err:
        raise ConfigError(f"{path}: [tree]: {err}") from err
    if paths != "all":
        if not isinstance(paths, list) or any(p not in names for p in paths):
            raise ConfigError(f"{path}: [tree].paths: {paths!r} is not 'all' or a list of "
                              f"{names}")
        if not tree.get("per_channel") and any("(pc)" in p for p in paths):
            raise ConfigError(f"{path}: [tree].paths names per-channel leaves but "
                              "[tree].per_channel is not true")
    for key in ("prune_skip", "cluster_skip"):
        if key in tree and (not isinstance(tree[key], list)
                            or not all(isinstance(v, str) for v in tree[key])):
            raise ConfigError(f"{path}: [tree].{key} must be a list of layer names or layer "
                              f"class names such as [\"DepthwiseConv2D\"], got {tree[key]!r}")
    from collabopt.quantization import BATCHNORM

    if tree.get("batchnorm", "keep") not in BATCHNORM:
        raise ConfigError(f"{path}: [tree].batchnorm must be one of {list(BATCHNORM)}, got "
                          f"{tree['batchnorm']!r}")
    if "seed" in tree and (not isinstance(tree["seed"], int) or isinstance(tree["seed"], bool)
                           or tree["seed"] < 0):
        raise ConfigError(f"{path}: [tree].seed must be a non-negative integer, got "
                          f"{tree['seed']!r}")
    if not isinstance(tree.get("bias_correction", True), bool):
        raise ConfigError(f"{path}: [tree].bias_correction must be true or false, got "
                          f"{tree['bias_correction']!r}")
    if "workers" in tree and (not isinstance(tree["workers"], int)
                              or isinstance(tree["workers"], bool) or tree["workers"] < 1):
        raise ConfigError(f"{path}: [tree].workers must be a positive integer (local "
                          f"processes), got {tree['workers']!r}")
    if "dask_scheduler" in tree:
        if not isinstance(tree["dask_scheduler"], str) or "://" not in tree["dask_scheduler"]:
            raise ConfigError(f"{path}: [tree].dask_scheduler must be a scheduler address "
                              f"such as \"tcp://10.0.0.5:8786\", got {tree['dask_scheduler']!r}")
        if "workers" in tree:
            raise ConfigError(f"{path}: [tree] sets both workers (local processes) and "
                              "dask_scheduler (a cluster): choose one")
    if "higher_is_better" in tree and not isinstance(tree["higher_is_better"], bool):
        raise ConfigError(f"{path}: [tree].higher_is_better must be true or false, got "
                          f"{tree['higher_is_better']!r}")
    if "metric" in tree:
        from collabopt.metrics import resolve

        if not isinstance(tree["metric"], str):
            raise ConfigError(f"{path}: [tree].metric must be a Keras metric name such as "
                              f"\"mse\" or \"auc\", got {tree['metric']!r}")
        try:
            resolve(tree["metric"], tree.get("higher_is_better"))
        except ValueError as err:
            raise ConfigError(f"{path}: [tree].metric: {err}") from err
    if tree.get("layer_policy", "all") not in ("all", "auto"):
        raise ConfigError(f"{path}: [tree].layer_policy must be \"all\" or \"auto\", got "
                          f"{tree['layer_policy']!r}")
    threshold = tree.get("sensitivity_threshold", 0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise ConfigError(f"{path}: [tree].sensitivity_threshold must be a non-negative "
                          f"number (in the metric's units), got {threshold!r}")
    if tree.get("layer_policy") == "auto" and "sensitivity_threshold" not in tree and \
            not {"max_metric_drop", "max_accuracy_drop"} & set(config.get("targets", {})):
        raise ConfigError(f"{path}: [tree].layer_policy = \"auto\" needs a threshold: "
                          "[targets].max_metric_drop or [tree].sensitivity_threshold")
    if not isinstance(tree.get("distill", False), bool):
        raise ConfigError(f"{path}: [tree].distill must be true or false, got "
                          f"{tree['distill']!r}")
    try:
        _distill(tree)
    except ValueError as err:
        raise ConfigError(f"{path}: [tree].distill_*: {err}") from err
    for key, value in config.get("targets", {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{path}: [targets].{key} must be a non-negative number, got "
                              f"{value!r}")
    if {"max_metric_drop", "max_accuracy_drop"} <= set(config.get("targets", {})):
        raise ConfigError(f"{path}: [targets] sets max_metric_drop and max_accuracy_drop, "
                          "the same limit: keep one")
    if "search" in config:
        try:
            config["search"] = _search(config["search"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: [search]: {err}") from err
        if config["search"].leaf.endswith("(pc)") and not tree.get("per_channel"):
            raise ConfigError(f"{path}: [search].leaf {config['search'].leaf!r} is a "
                              "per-channel leaf but [tree].per_channel is not true")
    tree["out_dir"] = (path.parent / tree.get("out_dir", "runs/" + path.stem)).resolve()
    return config


def _search(section: dict):
    """The run's co.Search from [search] (ranges are [low, high] lists in TOML)."""
    from collabopt.search import Search

    return Search(**section)


def _distill(tree: dict):
    """The tree's co.Distill from [tree] distill / distill_temperature / distill_weight."""
    from collabopt.distillation import Distill

    if not tree.get("distill", False):
        return None
    return Distill(temperature=tree.get("distill_temperature", 4.0),
                   weight=tree.get("distill_weight", 0.5))


class _executor:
    """The executor a command asked for: N local processes, a Dask cluster, or none."""

    def __init__(self, workers: int | None, dask_scheduler: str | None):
        self.workers, self.dask_scheduler, self._close = workers, dask_scheduler, []

    def __enter__(self):
        from collabopt import parallel

        if self.dask_scheduler:
            try:
                from distributed import Client
            except ImportError as err:
                raise ConfigError("[tree].dask_scheduler needs Dask: pip install "
                                  "'collabopt[dask]'") from err
            try:
                client = Client(self.dask_scheduler, timeout="10s")
            except OSError as err:
                raise ConfigError(f"[tree].dask_scheduler: no Dask scheduler answers at "
                                  f"{self.dask_scheduler} ({err})") from err
            self._close.append(client.close)
            print(f"[tree] nodes run on the Dask cluster at {self.dask_scheduler} "
                  f"({len(client.scheduler_info()['workers'])} workers now)")
            return client.get_executor()
        if self.workers and self.workers > 1:
            pool = parallel.local_executor(self.workers)
            self._close.append(pool.shutdown)
            print(f"[tree] nodes run on {self.workers} local worker processes")
            return pool
        return None

    def __exit__(self, *exc):
        for close in self._close:
            close()


def _load_data(config: dict, path: Path):
    import numpy as np

    data = config["data"]
    if "npz" in data:
        file = (path.parent / data["npz"]).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: [data].npz: {file} does not exist")
        with np.load(file) as z:
            missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in z.files]
            if missing:
                raise ConfigError(f"{path}: [data].npz: {file.name} lacks key(s) {missing} "
                                  "(needs x_train, y_train, x_val, y_val)")
            return (z["x_train"], z["y_train"]), (z["x_val"], z["y_val"])
    spec = data["loader"]
    module, _, func = spec.partition(":")
    if not func:
        raise ConfigError(f"{path}: [data].loader must be 'package.module:function', "
                          f"got {spec!r}")
    try:
        loaded = getattr(importlib.import_module(module), func)()
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{path}: [data].loader {spec!r} cannot be imported ({err})") from err
    if isinstance(loaded, dict):
        return (loaded["x_train"], loaded["y_train"]), (loaded["x_val"], loaded["y_val"])
    return loaded


def run(config_path: Path, force: bool, workers: int | None = None) -> int:
    import keras

    import collabopt as co
    from collabopt.core.rewrite import AllExcept

    config = load_config(config_path)
    train, val = _load_data(config, config_path)
    try:
        model = keras.models.load_model(config["model"]["path"])
    except Exception as err:  # noqa: BLE001 - any load failure: say which file
        raise ConfigError(f"{config_path}: [model].path: {config['model']['path']} is not a "
                          f"loadable Keras model ({err})") from err
    t = config.get("train", {})
    optimizer = keras.optimizers.get(t.get("optimizer", "adam"))
    optimizer.learning_rate = t.get("learning_rate", 1e-4)
    loss = t.get("loss", "sparse_categorical_crossentropy")
    if loss == "sparse_categorical_crossentropy":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=t.get("from_logits",
                                                                           False))
    qat_optimizer = optimizer.__class__.from_config(optimizer.get_config())
    qat_optimizer.learning_rate = t.get("qat_learning_rate", t.get("learning_rate", 1e-4))
    tree_cfg = config["tree"]
    selectors = {}
    for key in ("prune_skip", "cluster_skip"):
        if key in tree_cfg:
            selector = AllExcept(tuple(tree_cfg[key]))
            if unknown := selector.unknown(model):
                raise ConfigError(
                    f"{config_path}: [tree].{key}: {unknown} match no layer of the model (by "
                    f"name or class); its layers: {[layer.name for layer in model.layers]}")
            selectors[key.replace("_skip", "_layers")] = selector
    metric = tree_cfg.get("metric")  # the tree scores with it; fit shows accuracy by default
    shown = ["accuracy"] if metric in (None, "accuracy") else []
    tree = co.DeploymentTree(
        model, train, val, compile={"optimizer": optimizer, "loss": loss, "metrics": shown},
        qat_compile={"optimizer": qat_optimizer, "loss": loss, "metrics": shown},
        fit={"epochs": t.get("epochs", 1), "batch_size": t.get("batch_size", 32), "verbose": 2},
        sparsity=tree_cfg.get("sparsity", 0.5), clusters=tree_cfg.get("clusters", 16),
        per_channel=tree_cfg.get("per_channel", False),
        batchnorm=tree_cfg.get("batchnorm", "keep"), seed=tree_cfg.get("seed", 0),
        bias_correction=tree_cfg.get("bias_correction", True), metric=metric,
        higher_is_better=tree_cfg.get("higher_is_better"),
        layer_policy=tree_cfg.get("layer_policy", "all"),
        sensitivity_threshold=tree_cfg.get("sensitivity_threshold"), distill=_distill(tree_cfg),
        targets=co.Targets(**config.get("targets", {})), **selectors)
    if workers is not None and "dask_scheduler" in tree_cfg:
        raise ConfigError(f"{config_path}: --workers runs local processes, but [tree] names a "
                          "dask_scheduler: drop one")
    if "search" in config:  # [search]: Optuna trials of one path instead of the whole tree
        found = tree.search(tree_cfg["out_dir"], config["search"], force=force)
        print()
        print(found)
        best = found.recommended
        print(f"\nrecommended trial: {best['number'] if best else 'none meets the targets'}"
              + (f" ({best['file']})" if best else ""))
        print(f"trade-off plot: {found.plot}")
        return 0
    with _executor(workers or tree_cfg.get("workers"), tree_cfg.get("dask_scheduler")) as ex:
        result = tree.explore(tree_cfg["out_dir"], paths=tree_cfg.get("paths", "all"),
                              stop_when_met=tree_cfg.get("stop_when_met", False), force=force,
                              executor=ex)
    print()
    print(result)
    print(f"\nrecommended leaf: {result.recommended or 'none meets the targets'}")
    print(f"report: {result.report_md}  and  {result.report_html}")
    return 0


# --- export-c -----------------------------------------------------------------------------
def export_c_command(path: Path, out: Path, name: str, vela: bool, accelerator: str) -> int:
    import collabopt as co

    try:
        files = co.export_c(path, out, name=name,
                            vela_accelerator=accelerator if vela else None)
    except ValueError as err:  # a file TFLM cannot run, a bad name, a custom op
        print(f"collabopt export-c: error: {err}", file=sys.stderr)
        return 2
    for kind, file in files.items():
        print(f"{kind:12s} {file}")
    print(f"compile {files['source'].name} into your firmware; {files['ops'].name} registers "
          "exactly the kernels the model needs")
    return 0


# --- inspect ------------------------------------------------------------------------------
def inspect_command(path: Path, vela: bool, as_json: bool, accelerator: str,
                    tflm: bool = False) -> int:
    import collabopt as co

    report = co.inspect(path)
    vela_report = co.vela_report(path, accelerator) if vela else None
    tflm_report = co.tflm_report(path) if tflm else None
    if as_json:
        out = report.to_dict()
        if vela_report:
            out["vela"] = vela_report.to_dict()
        if tflm_report:
            out["tflm"] = tflm_report.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(report.table())
        if tflm_report:
            print(tflm_report.summary)
        if vela_report:
            v = vela_report
            print(f"Vela ({v.accelerator}): weights {v.original_weight_bytes:,} -> "
                  f"{v.encoded_weight_bytes:,} bytes encoded, SRAM {v.sram_bytes:,} B, "
                  f"flash {v.flash_bytes:,} B, {v.cycles:,} cycles = {v.inference_ms:.3f} ms "
                  f"at {v.clock_mhz:g} MHz, {v.npu_ops} NPU / {v.cpu_ops} CPU ops")
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="collabopt", description=(
        "Collaborative optimization (prune -> cluster -> int8 QAT) for Keras 3, verified "
        "inside the exported TFLite file."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="explore the whole deployment tree on an MNIST CNN")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="small subset, few epochs (minutes)")
    p.add_argument("--force", action="store_true", help="start over in --out")
    p.add_argument("--workers", type=_positive, help="train independent nodes in N processes")
    p = sub.add_parser("run", help="explore the tree for your model, as a TOML config says")
    p.add_argument("config", type=Path)
    p.add_argument("--force", action="store_true", help="start over in the config's out_dir")
    p.add_argument("--workers", type=_positive,
                   help="train independent nodes in N local processes ([tree].workers)")
    p = sub.add_parser("inspect", help="what survived in a .tflite file")
    p.add_argument("file", type=Path)
    p.add_argument("--vela", action="store_true", help="add Arm Vela figures (ethos-u-vela)")
    p.add_argument("--accelerator", default="ethos-u55-128")
    p.add_argument("--tflm", action="store_true",
                   help="run it on TFLite Micro: ops, measured arena, flash (tflite-micro)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("export-c", help="C++ source of a .tflite for TFLite Micro firmware")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for the .cc / .h files")
    p.add_argument("--name", default="model", help="C identifier prefix (default: model)")
    p.add_argument("--vela", action="store_true",
                   help="also the Vela-compiled .tflite for Ethos-U, and its C source")
    p.add_argument("--accelerator", default="ethos-u55-128")
    args = parser.parse_args(argv)
    from collabopt.datasets import DataError
    from collabopt.inspection import InvalidModelError
    from collabopt.micro import TFLMNotInstalled
    from collabopt.tree import ConfigMismatch
    from collabopt.vela import VelaNotInstalled

    try:
        if args.command == "demo":
            return demo(args.out, args.quick, args.force, args.workers)
        if args.command == "run":
            return run(args.config, args.force, args.workers)
        if args.command == "export-c":
            return export_c_command(args.file, args.out, args.name, args.vela,
                                    args.accelerator)
        return inspect_command(args.file, args.vela, args.json, args.accelerator, args.tflm)
    except (ConfigError, ConfigMismatch, InvalidModelError, FileNotFoundError, DataError,
            VelaNotInstalled, TFLMNotInstalled) as err:
        print(f"collabopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncollabopt {args.command}: interrupted; finished nodes are saved, run the same "
              "command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
