"""Make collabopt's layers known to Keras' loader without importing Keras ourselves.

``keras.models.load_model`` finds a custom layer through Keras' registry of serializable
objects, filled when the layer's module runs. Importing our layer modules on
``import collabopt`` would import Keras and TensorFlow eagerly. Instead, as soon as Keras is
loaded (now, or later through a one-shot import hook) we register light proxies whose
``from_config`` imports the real class; the real module's own registration then replaces
the proxy. Nothing of ours is imported from inside Keras' import, so no import cycles.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

CLASSES = {
    "OptimizedLayer": "collabopt.core.wrapper",
    "ActivationRange": "collabopt.core.wrapper",
    "PruneMask": "collabopt.pruning",
    "ClusterWeights": "collabopt.clustering",
    "WeightFakeQuant": "collabopt.quantization",
    "FoldedBatchNorm": "collabopt.batchnorm",
}


def _proxy(name: str, module: str) -> type:
    def from_config(cls, config):
        real = getattr(importlib.import_module(module), name)
        return real.from_config(config)

    return type(f"Lazy{name}", (), {"from_config": classmethod(from_config),
                                    "__doc__": f"Loads {module}.{name} on first use."})


def register() -> None:
    keras = sys.modules["keras"]
    registry = keras.saving.get_custom_objects()
    for name, module in CLASSES.items():
        registry.setdefault(f"collabopt>{name}", _proxy(name, module))


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
    if "keras" in sys.modules and hasattr(sys.modules["keras"], "saving"):
        register()
    elif not any(isinstance(f, _AfterKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterKeras())
