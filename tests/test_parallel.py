"""The tree's nodes as tasks on an executor: same leaves as the sequential run, faults isolated."""

import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import keras
import pytest

import collabopt as co
from collabopt import parallel

PATHS = ["PTQ", "QAT", "prune → PTQ", "PQAT", "cluster → PTQ"]  # nodes: qat prune pqat cluster


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _tree(trained, digits, callbacks=()):
    (x, y), (xt, yt) = digits
    return co.DeploymentTree(
        trained, (x[:600], y[:600]), (xt[:200], yt[:200]),
        compile={"optimizer": keras.optimizers.Adam(3e-4), "loss": _loss()},
        fit={"epochs": 1, "batch_size": 64, "verbose": 0, "callbacks": list(callbacks)},
        clusters=8, latency_runs=1, vela_accelerator=None)


def _pool(workers=2):
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _leaves(result):
    """What must not depend on where a node trained: the int8 file, byte for byte."""
    return {r["path"]: (r["int8_accuracy"], open(r["file"], "rb").read()) for r in result.rows}


class KillNode(keras.callbacks.Callback):
    """Kills the training process of one node after its fit, as if mid-save (test only)."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def on_train_end(self, logs=None):
        run, name = sys.argv[-2:]  # python -m collabopt.parallel RUN NODE
        if name == self.node:
            (Path(run) / "nodes" / f"{name}.partial.keras").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, trained, digits):
    return _tree(trained, digits).explore(tmp_path_factory.mktemp("seq") / "run", paths=PATHS,
                                          log=lambda m: None)


@pytest.mark.slow
def test_process_pool_gives_the_sequential_leaves(tmp_path, trained, digits, sequential):
    messages = []
    with _pool() as pool:
        result = _tree(trained, digits).explore(tmp_path / "run", paths=PATHS,
                                                executor=pool, log=messages.append)
    assert not result.failed
    assert _leaves(result) == _leaves(sequential)
    started = [m.split(":")[0] for m in messages if "on a worker" in m]
    # prune, cluster and qat start together (all from the base); pqat once prune is stored
    assert started[:3] == ["[tree] prune", "[tree] cluster", "[tree] qat"], messages
    assert started[3] == "[tree] pqat"
    assert (tmp_path / "run" / "nodes" / "pqat.log").exists()


@pytest.mark.slow
def test_a_killed_node_fails_alone_and_a_rerun_trains_only_it(tmp_path, trained, digits,
                                                             sequential):
    run, messages = tmp_path / "run", []
    with _pool() as pool:
        result = _tree(trained, digits, [KillNode("prune")]).explore(
            run, paths=PATHS, executor=pool, log=messages.append)
    assert {f["path"] for f in result.failed} == {"prune → PTQ", "PQAT"}
    by = {f["path"]: f["error"] for f in result.failed}
    assert "SIGKILL" in by["prune → PTQ"] and "parent prune failed" in by["PQAT"]
    assert {r["path"] for r in result.rows} == {"PTQ", "QAT", "cluster → PTQ"}
    assert not list(run.rglob("*.partial*")) and not (run / "nodes" / "prune.keras").exists()
    assert "Failed leaves" in (run / "report.md").read_text()

    messages.clear()
    with _pool() as pool:
        again = _tree(trained, digits).explore(run, paths=PATHS, executor=pool,
                                               log=messages.append)
    assert not again.failed
    assert sorted(m.split(":")[0] for m in messages if "on a worker" in m) == [
        "[tree] pqat", "[tree] prune"]
    assert _leaves(again) == _leaves(sequential)


@pytest.mark.slow
def test_dask_cluster_on_loopback(tmp_path, trained, digits, sequential):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        result = _tree(trained, digits).explore(
            tmp_path / "run", paths=["PTQ", "cluster → PTQ", "QAT"],
            executor=client.get_executor(), log=print)
    assert not result.failed
    expected = _leaves(sequential)
    assert _leaves(result) == {k: expected[k] for k in ("PTQ", "cluster → PTQ", "QAT")}


def test_what_cannot_reach_a_worker_fails_before_any_training(tmp_path, trained, digits):
    import tensorflow as tf

    (x, y), val = digits
    data = tf.data.Dataset.from_tensor_slices((x[:64], y[:64])).batch(32)
    tree = co.DeploymentTree(trained, data, val, vela_accelerator=None)
    with pytest.raises(ValueError, match="numpy arrays"), _pool(1) as pool:
        tree.explore(tmp_path / "run", executor=pool, log=lambda m: None)
    assert not list((tmp_path / "run" / "nodes").glob("*.keras"))
    with pytest.raises(ValueError, match="positive integer"):
        parallel.local_executor(0)


def test_a_failing_node_in_a_sequential_run_fails_its_leaves_only(tmp_path, trained, digits):
    class Explode(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if any(type(t).__name__ == "PruneMask" for layer in self.model.layers
                   for t in getattr(layer, "transforms", ())):
                raise RuntimeError("boom")

    result = _tree(trained, digits, [Explode()]).explore(
        tmp_path / "run", paths=["PTQ", "prune → PTQ", "PQAT"], log=lambda m: None)
    assert [r["path"] for r in result.rows] == ["PTQ"]
    assert {f["path"]: f["error"] for f in result.failed} == {
        "prune → PTQ": "node prune: RuntimeError: boom",
        "PQAT": "node prune: RuntimeError: boom"}


def test_a_node_whose_parent_failed_earlier_is_reported_not_trained(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from collabopt.tree import _plan

    class Tree:
        nodes = _plan(per_channel=False)[0]

    (tmp_path / "nodes").mkdir()
    messages = []
    with ThreadPoolExecutor(1) as never_used:
        failed = parallel.train_nodes(Tree, tmp_path, ["pqat", "pcqat"], never_used,
                                      messages.append)
    assert failed == {"pqat": "its parent prune failed",
                      "pcqat": "its parent prune_cluster failed"}
    assert parallel.needed_nodes(Tree, {"pcqat"}) == ["base", "prune", "prune_cluster",
                                                     "pcqat"]
