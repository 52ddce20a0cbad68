"""Tree nodes as tasks on a ``concurrent.futures.Executor``: the deployment tree in parallel.

Every node whose parent is trained can start at once (QAT, prune and both cluster nodes all
start from the base), so with one worker per node the wall time of a tree is its depth —
three fine-tunes — not its number of nodes. The engine is the user's: a local
``ProcessPoolExecutor``, ``dask.distributed.Client(...).get_executor()``, Ray's executor, any
``Executor``; nothing here schedules beyond "submit a node once its parent is stored".

A task needs nothing but the run folder (on a file system every worker sees) and the node's
name: the explorer writes the tree's configuration, the base model and the training data
there once (``tasks/``). The task trains its node in a child process of the worker and the
child writes the node's checkpoint atomically, as the sequential explorer does. A child that
dies (killed, out of memory, a segfault in a native library) fails that node alone, with its
reason, and leaves no partial file; the worker itself lives on, so a process pool is not
broken for the other nodes (a dead pool worker breaks every task of the pool).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from pathlib import Path

TASKS = "tasks"  # the run folder's subfolder holding what a task needs


class NodeFailed(RuntimeError):
    """A node's training process failed; ``reason`` says how, ``log`` is its output."""

    def __init__(self, node: str, reason: str, log: str = ""):
        super().__init__(f"node {node!r} failed: {reason}")
        self.node, self.reason, self.log = node, reason, log

    def __reduce__(self):  # crosses process boundaries (pool, Dask, Ray) intact
        return NodeFailed, (self.node, self.reason, self.log)


# --- what a task reads from the run folder -----------------------------------------------------
def prepare_run(tree, out: Path) -> None:
    """Write the tree's configuration, its base model and training data into ``out/tasks``."""
    try:
        import cloudpickle as pickler  # compile functions and lambdas, by value
    except ImportError:  # pragma: no cover - every engine we document ships cloudpickle
        pickler = pickle
    tasks = out / TASKS
    tasks.mkdir(parents=True, exist_ok=True)
    # the metric scores leaves, which the explorer builds itself: workers only train
    state = {k: v for k, v in vars(tree).items()
             if k not in ("model", "train", "val", "metric")}
    state["custom_objects"] = _custom_objects(tree.model)
    try:
        config = pickler.dumps(state)
    except Exception as err:  # noqa: BLE001 - any pickling failure: name the cause
        raise ValueError(
            f"executor= sends the tree's configuration to the workers, but it cannot be "
            f"pickled ({type(err).__name__}: {err}). Pass compile= and fit= callbacks that "
            "pickle: module-level functions and classes (install cloudpickle for lambdas)."
        ) from err
    try:
        data = pickle.dumps(tree.train, protocol=5)
    except Exception as err:  # noqa: BLE001
        raise ValueError(
            f"executor= stores the training data in the run folder for the workers, but "
            f"{type(tree.train).__name__} cannot be pickled ({err}). Pass numpy arrays "
            "(x, y) or a keras.utils.PyDataset defined in an importable module.") from err
    _atomic_bytes(tasks / "tree.pkl", config)
    _atomic_bytes(tasks / "train.pkl", data)
    base = out / "nodes" / "base.keras"
    tmp = base.with_name("base.partial.keras")
    tree.model.save(tmp)
    os.replace(tmp, base)


def load_tree(out: Path):
    """The ``DeploymentTree`` a task trains with, rebuilt from the run folder."""
    import keras

    from collabopt.tree import DeploymentTree

    state = pickle.loads((out / TASKS / "tree.pkl").read_bytes())
    custom = state.pop("custom_objects")
    tree = DeploymentTree.__new__(DeploymentTree)
    vars(tree).update(state)
    tree.custom_objects = custom
    with keras.saving.custom_object_scope(custom):
        tree.model = keras.models.load_model(out / "nodes" / "base.keras", safe_mode=True)
    tree.train = pickle.loads((out / TASKS / "train.pkl").read_bytes())
    tree.val = None  # leaves are evaluated by the explorer, not by tasks
    return tree


def _custom_objects(model) -> dict:
    """The model's own layer classes by registered name: a worker may not have imported
    the module that registers them (or it is ``__main__``, which cloudpickle sends by value)."""
    import keras

    from collabopt.core.rewrite import iter_layers

    classes = {type(model)} | {type(layer) for layer in iter_layers(model)}
    return {keras.saving.get_registered_name(cls): cls for cls in classes
            if not cls.__module__.startswith(("keras.", "collabopt."))}


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the task -------------------------------------------------------------------------------
def train_node(run_dir: str, name: str, attempt: str = "") -> dict:
    """Train node ``name`` of the tree stored in ``run_dir``: the task an executor runs.

    The node trains in a child process whose output goes to ``nodes/<name>.log``; a failure
    raises ``NodeFailed`` with the reason (the exception, or the signal that killed it).
    ``attempt`` only makes each submission distinct: an engine that caches results by
    arguments (Dask's pure tasks) must not hand back an earlier attempt's failure.
    """
    out = Path(run_dir)
    log_file = out / "nodes" / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "collabopt.parallel", str(out), name],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    for partial in (out / "nodes").glob(f"{name}.partial*"):  # a death mid-save
        partial.unlink()
    if proc.returncode != 0:
        text = log_file.read_text(errors="replace")
        raise NodeFailed(name, _reason(proc.returncode, text, log_file), text[-4000:])
    return {"node": name, "seconds": time.perf_counter() - start,
            "host": socket.gethostname(), "log": str(log_file)}


def _reason(returncode: int, text: str, log_file: Path) -> str:
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        return (f"its training process was killed by {sig} (the out-of-memory killer, a "
                f"crash in native code, or a user); its output: {log_file}")
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {returncode}"
    return f"{last} (whole output: {log_file})"


def _child_main(run_dir: str, name: str) -> None:
    import keras

    out = Path(run_dir)
    tree = load_tree(out)
    node = next(n for n in tree.nodes if n.name == name)
    with keras.saving.custom_object_scope(tree.custom_objects):
        parent = tree.model if node.parent == "base" else keras.models.load_model(
            out / "nodes" / f"{node.parent}.keras", safe_mode=True)
        tree._train_and_store(node, parent, out, print)


# --- the explorer's side ------------------------------------------------------------------------
def needed_nodes(tree, node_names) -> list[str]:
    """``node_names`` and their ancestors, in the tree's order."""
    parents = {n.name: n.parent for n in tree.nodes}
    needed = set()
    for name in node_names:
        while name is not None:
            needed.add(name)
            name = parents[name]
    return [n.name for n in tree.nodes if n.name in needed]


def train_nodes(tree, out: Path, names: list[str], executor: Executor, log) -> dict[str, str]:
    """Train every node of ``names`` not stored yet, each as soon as its parent is stored.

    Returns {node: reason} for the nodes that failed or whose parent failed; the others
    are stored in ``out/nodes``. ``prepare_run`` must have written ``out/tasks``.
    """
    parent_of = {n.name: n.parent for n in tree.nodes}
    op_of = {n.name: n.op for n in tree.nodes}

    def stored(name):
        return name == "base" or (out / "nodes" / f"{name}.keras").exists()

    todo = [n for n in names if not stored(n)]
    failed: dict[str, str] = {}
    running: dict[Future, str] = {}
    attempt = f"{os.getpid()}-{time.time_ns()}"
    while todo or running:
        for name in list(todo):
            parent = parent_of[name]
            if parent in failed:
                todo.remove(name)
                failed[name] = f"its parent {parent} failed"
                log(f"[tree] {name}: skipped, {failed[name]}")
            elif stored(parent):
                todo.remove(name)
                try:
                    running[executor.submit(train_node, str(out.resolve()), name, attempt)] = name
                except Exception as err:  # noqa: BLE001 - a shut-down or broken executor
                    failed[name] = f"the executor refused it ({type(err).__name__}: {err})"
                    log(f"[tree] {name}: FAILED, {failed[name]}")
                    continue
                log(f"[tree] {name}: {op_of[name]} of {parent}, fine-tuning on a worker "
                    f"(output: {out / 'nodes' / (name + '.log')})")
        if not running:  # what is left waits on a parent that failed before this call
            for name in todo:
                failed[name] = f"its parent {parent_of[name]} failed"
                log(f"[tree] {name}: skipped, {failed[name]}")
            break
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            name = running.pop(future)
            try:
                info = future.result()
                log(f"[tree] {name}: trained in {info['seconds']:.1f}s on {info['host']}")
            except NodeFailed as err:
                failed[name] = err.reason
                log(f"[tree] {name}: FAILED, {err.reason}")
            except Exception as err:  # noqa: BLE001 - the engine's own failure (lost worker)
                failed[name] = f"{type(err).__name__}: {err}"
                log(f"[tree] {name}: FAILED, {failed[name]}")
    return failed


def local_executor(workers: int) -> Executor:
    """``workers`` local processes (``collabopt run --workers N``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    # spawn: a forked copy of a process running TensorFlow's threads can deadlock
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


if __name__ == "__main__":
    _child_main(*sys.argv[1:3])
