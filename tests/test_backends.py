"""prune, cluster (every init, per tensor and per channel, zeros kept) and PCQAT train under
the JAX and PyTorch backends with the same invariants; the models they save load under
TensorFlow and export to verified int8 files. Each backend runs in its own process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"


def _run(script, *args, backend="tensorflow"):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend,module", [("jax", "jax"), ("torch", "torch")])
def test_backend_pipeline_then_tensorflow_export(tmp_path, backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'collabopt[{backend}]')")
    result = _run("backend_pipeline.py", tmp_path, backend=backend)
    assert result["backend"] == backend
    assert result["base"] > 0.9 and result["prune_sparsity"] == 0.5
    for tag in ("pt", "pc"):
        for layer in ("conv1", "conv2", "logits"):
            assert result[f"{tag}_{layer}_zeros_kept"], (tag, layer)
            assert result[f"{tag}_{layer}_unique"] <= 8, (tag, layer)
        assert result[f"{tag}_accuracy"] > result["base"] - 0.05  # accuracy recovers
    exported = _run("export_saved.py", tmp_path)  # under TensorFlow
    assert set(exported) == {"pcqat_pt", "pcqat_pc"}
    for tag, r in exported.items():
        assert r["verified"] == 3
        assert abs(r["accuracy"] - result[f"{tag[-2:]}_accuracy"]) <= 0.01
