"""tfmot 0.8.1 on the models of ``collabopt.zoo``: which stages of the deployment tree it can
build at all. Runs inside benchmarks/tfmot_env, called by bench_models.py: builds the zoo
model from src/collabopt/zoo.py with tf_keras standing in for Keras 3 (same layers, same
seed), fine-tunes every node one epoch on the data bench_models.py saved, and writes each
leaf's file, the exported Keras model's outputs on the validation inputs and status.json
(rewritten after every leaf, so a converter crash loses only the leaf it killed). Not meant to
be run by hand.

    tfmot_env/bin/python tfmot_zoo.py WORKDIR MODEL SPARSITY CLUSTERS STAGE [STAGE ...]
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from tfmot_tree import export, keras, leaf_makers, slug, sparsity_api

ROOT = Path(__file__).resolve().parents[1]


def load_zoo():
    """collabopt/zoo.py executed with ``keras`` meaning tf_keras (it uses no Keras 3 API)."""
    sys.modules["keras"] = keras
    spec = importlib.util.spec_from_file_location("zoo_tf_keras",
                                                  ROOT / "src" / "collabopt" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    work, name = Path(sys.argv[1]), sys.argv[2]
    sparsity, clusters, stages = float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    data = np.load(work / "data.npz")
    x, y, x_val = data["x_train"], data["y_train"], data["x_val"]
    batch = 16
    zoo = load_zoo()
    out = work / "tfmot"
    out.mkdir(exist_ok=True)

    def base():
        keras.utils.set_random_seed(0)
        return zoo.ZOO[name]()[0]

    probabilities = getattr(getattr(base().layers[-1], "activation", None), "__name__",
                            "") == "softmax"

    def fit(model, rate=None):
        keras.utils.set_random_seed(0)
        model.compile(keras.optimizers.Adam(rate or 1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
        callbacks = [sparsity_api.UpdatePruningStep()] if any(
            "prune_low_magnitude" in layer.name for layer in model.layers) else []
        model.fit(x, y, epochs=1, batch_size=batch, verbose=0, callbacks=callbacks)
        return model

    end = max(1, 2 * (-(-len(x) // batch)) // 3)
    schedule = sparsity_api.PolynomialDecay(0.0, sparsity, begin_step=0, end_step=end,
                                            frequency=1)
    leaves = leaf_makers(base, fit, clusters, schedule, 1e-4)
    status = {}
    for stage in stages:
        start = time.perf_counter()
        try:
            model, is_qat = leaves[stage]()
            export(model, out / f"{slug(stage)}.tflite", is_qat, x)
            np.save(out / f"{slug(stage)}.keras_out.npy", model.predict(x_val, verbose=0))
            status[stage] = {"status": "ok"}
        except Exception as err:  # noqa: BLE001 - report what tfmot cannot do
            last = traceback.format_exception_only(err)[-1].strip()
            status[stage] = {"status": "error", "error": last[:300]}
        status[stage]["seconds"] = time.perf_counter() - start
        print(stage, status[stage], flush=True)
        (out / "status.json").write_text(json.dumps(status, indent=2))


if __name__ == "__main__":
    main()
