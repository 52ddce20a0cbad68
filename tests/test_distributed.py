"""Distributed training and mixed precision keep the invariants."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import collabopt as co

from .conftest import compile_model, tiny_conv_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device():
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "mirrored.py"),
                          str(ROOT)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for name, r in out.items():
        single, mirrored = r["single"], r["mirrored"]
        assert single["step"] == mirrored["step"] == 8, name
        np.testing.assert_array_equal(single["zeros"], mirrored["zeros"], err_msg=name)
        assert mirrored["unique"] == single["unique"], name
        # activation ranges see per-replica batches (averaged), hence a small tolerance
        np.testing.assert_allclose(single["kernel"], mirrored["kernel"], atol=1e-3,
                                   err_msg=name)
    assert out["cluster"]["mirrored"]["unique"] <= 4


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_invariants(policy):
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    keras.mixed_precision.set_global_policy(policy)
    try:
        base = tiny_conv_model()
        pruned = compile_model(co.prune(base, 0.5, verbose=False))
        pruned.fit(x, y, epochs=1, verbose=0)
        pruned = co.strip(pruned)
        clustered = compile_model(co.cluster(pruned, 4, verbose=False))
        clustered.fit(x, y, epochs=1, verbose=0)
        qat = compile_model(co.quantize(co.strip(clustered), verbose=False))
        qat.fit(x, y, epochs=1, verbose=0)
        for t in qat.get_layer("pw").transforms:
            assert all(v.dtype == "float32" for v in t.weights)  # state stays float32
        k = co.strip(qat).get_layer("pw").kernel.numpy()
        assert np.all(k[pruned.get_layer("pw").kernel.numpy() == 0] == 0)  # zeros kept
        assert np.unique(k).size <= 4
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes_on_loopback():
    import os

    cluster = {"worker": [f"localhost:{_free_port()}" for _ in range(2)]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
               "TF_CONFIG": json.dumps({"cluster": cluster,
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "scripts" / "multiworker.py"), str(ROOT)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert a["kernel"] == b["kernel"] and a["mask"] == b["mask"]  # identical on both workers
    assert a["zeros_kept"] and a["unique"] <= 4
    assert a["step"] == b["step"] == 8 and abs(a["sparsity"] - 0.6) < 0.05


@pytest.mark.slow
def test_jax_data_parallel_matches_single_device():
    import importlib.util
    import os

    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed (pip install 'collabopt[jax]')")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" /
                                              "jax_data_parallel.py"), str(ROOT)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    single, parallel = out["single"], out["data_parallel"]
    assert out["devices"] == 2
    kept = np.array(parallel["zeros_after"])[np.array(parallel["zeros"])]
    assert single["zeros"] == parallel["zeros"] and kept.all()  # every zero kept
    assert parallel["unique"] <= 4
    np.testing.assert_allclose(single["kernel"], parallel["kernel"], atol=1e-4)
