"""Make collabopt's layers known to Keras' loader without importing Keras ourselves.

``keras.models.load_model`` finds our wrapper and transforms only once their modules have
run (``register_keras_serializable``). Importing them eagerly would import Keras, and with it
TensorFlow, on ``import collabopt``. Instead: if Keras is already loaded, register now;
otherwise register the moment Keras finishes loading.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_MODULES = ("collabopt.core.wrapper", "collabopt.pruning", "collabopt.clustering",
            "collabopt.quantization")


def register() -> None:
    for name in _MODULES:
        importlib.import_module(name)


class _AfterKeras(importlib.abc.MetaPathFinder):
    """A one-shot import hook: runs :func:`register` right after ``keras`` is executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "keras" in sys.modules:
        register()
    elif not any(isinstance(f, _AfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())
