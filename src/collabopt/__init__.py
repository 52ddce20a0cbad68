"""collabopt: collaborative optimization (prune -> cluster -> int8 QAT) for Keras 3.

The public API is resolved lazily, so ``import collabopt`` stays instant: Keras (and with it
TensorFlow, on the TensorFlow backend) loads on first use of a technique.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "prune": "pruning",
    "ConstantSparsity": "pruning",
    "PolynomialDecay": "pruning",
    "cluster": "clustering",
    "quantize": "quantization",
    "fold_batchnorm": "batchnorm",
    "correct_bias": "bias_correction",
    "strip": "core.rewrite",
    "register_layer": "core.registry",
    "WeightSpec": "core.registry",
    "export_tflite": "export",
    "check_int8": "export",
    "inspect": "inspection",
    "verify": "inspection",
    "evaluate_tflite": "inspection",
    "predict_tflite": "inspection",
    "VerificationError": "inspection",
    "vela_report": "vela",
    "tflm_report": "micro",
    "predict_tflm": "micro",
    "evaluate_tflm": "micro",
    "export_c": "firmware",
    "plot_weight_density": "plots",
    "plot_tradeoff": "plots",
    "sensitivity": "layer_sensitivity",
    "distill": "distillation",
    "Search": "search",
    "SearchResult": "search",
    "Distill": "distillation",
    "distillation_loss": "distillation",
    "DeploymentTree": "tree",
    "Targets": "tree",
}

__all__ = sorted(_API)

from collabopt import _registration  # noqa: E402

_registration.install()  # wrapped .keras files load with plain keras.models.load_model


_SUBMODULES = {"models", "datasets", "pruning", "clustering", "quantization", "export",
               "inspection", "batchnorm", "vela", "plots", "report", "tree", "cli", "core", "zoo",
               "micro", "firmware", "parallel"}


def __getattr__(name: str):
    if name in _SUBMODULES:  # co.models.ds_cnn(), co.datasets.mnist(), ...
        return importlib.import_module(f"collabopt.{name}")
    if name in _API:
        module = importlib.import_module(f"collabopt.{_API[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'collabopt' has no attribute {name!r}")


def __dir__():
    return __all__ + ["__version__"]
