"""Load .keras files trained on another backend (under TensorFlow), export and verify them."""

import json
import sys
from pathlib import Path

import keras

import collabopt as co
from collabopt import datasets

(x, y), (xt, yt) = datasets.digits()
out = {}
for file in sorted(Path(sys.argv[1]).glob("*.keras")):
    model = keras.models.load_model(file, safe_mode=True)
    path = co.export_tflite(model, file.with_suffix(".tflite"))
    checks = co.verify(path, model)
    out[file.stem] = {"verified": len(checks), "accuracy": co.evaluate_tflite(path, xt, yt)}
print(json.dumps(out))
