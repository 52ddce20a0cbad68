"""Knowledge distillation: the loss, the verb under fit and in a custom loop, every backend,
and the tree's distill= on every technique with the structure checked in the files."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import collabopt as co
from collabopt.distillation import distillation_loss

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def test_the_loss_against_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 10)).astype("float32"), rng.normal(size=(5, 10)).astype("float32")

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    for temp in (1.0, 4.0):
        ps, pt = softmax(s / temp), softmax(t / temp)
        expected = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1)) * temp ** 2
        assert _np(distillation_loss(s, t, temp)) == pytest.approx(expected, rel=1e-4)
        # probabilities in, the same value: taken back to log space first
        assert _np(distillation_loss(softmax(s), softmax(t), temp, from_logits=False)) == \
            pytest.approx(expected, rel=1e-3)
    assert _np(distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert _np(distillation_loss(s, t, kind="mse")) == pytest.approx(np.mean((s - t) ** 2),
                                                                       rel=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        co.Distill(temperature=0)
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        co.Distill(weight=1.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        co.Distill(kind="l1")


def _student_and_teacher(digits, trained):
    keras.utils.set_random_seed(1)
    student = co.models.mnist_cnn((8, 8, 1))
    return student, trained


def _agreement(a, b, x):
    return float(np.mean(a.predict(x, verbose=0).argmax(1) == b.predict(x, verbose=0).argmax(1)))


def test_a_student_learns_the_teacher_from_labels_that_say_nothing(digits, trained):
    """Shuffled labels: what the student learns beyond chance it can only have from the
    teacher. weight=1 follows the teacher; a small weight mostly the noise."""
    (x, y), (xt, _) = digits
    noise = np.random.default_rng(0).permutation(y)
    before = [w.copy() for w in trained.get_weights()]
    scores = {}
    for weight in (0.05, 1.0):
        student, teacher = _student_and_teacher(digits, trained)
        trainer = co.distill(student, teacher, temperature=2.0, weight=weight)
        trainer.compile(keras.optimizers.AdamW(3e-3, weight_decay=0.05),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        trainer.fit(x, noise, epochs=6, batch_size=32, verbose=0)
        scores[weight] = _agreement(student, teacher, xt)
    assert scores[1.0] > 0.85 and scores[0.05] < scores[1.0] - 0.2, scores
    for a, b in zip(before, trained.get_weights(), strict=True):  # the teacher untouched
        np.testing.assert_array_equal(a, b)
    with pytest.raises(NotImplementedError, match="save its student"):
        trainer.get_config()


def test_in_a_custom_training_loop(digits, trained):
    """The same loss in the user's own loop: Distiller.compute_loss with x, y and y_pred."""
    import tensorflow as tf

    (x, y), (xt, _) = digits
    student, teacher = _student_and_teacher(digits, trained)
    trainer = co.distill(student, teacher, temperature=2.0, weight=1.0)
    trainer.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    optimizer = keras.optimizers.Adam(3e-3)
    start = _agreement(student, teacher, xt)
    for _ in range(4):
        for i in range(0, len(x), 32):
            xb, yb = x[i:i + 32], y[i:i + 32]
            with tf.GradientTape() as tape:
                loss = trainer.compute_loss(xb, yb, trainer(xb, training=True))
            grads = tape.gradient(loss, student.trainable_variables)
            optimizer.apply_gradients(zip(grads, student.trainable_variables, strict=True))
    assert _agreement(student, teacher, xt) > max(0.85, start + 0.3)


def test_tree_distills_every_technique_and_the_files_keep_their_structure(tmp_path, trained,
                                                                           digits):
    (x, y), (xt, yt) = digits
    kw = dict(compile={"optimizer": keras.optimizers.Adam(3e-4),
                       "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
              fit={"epochs": 1, "batch_size": 64, "verbose": 0}, clusters=8, latency_runs=3,
              vela_accelerator=None)
    with pytest.raises(TypeError, match="distill must be"):
        co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt), distill="yes", **kw)
    tree = co.DeploymentTree(trained, (x[:600], y[:600]), (xt, yt),
                             distill=co.Distill(temperature=2.0, weight=0.5), **kw)
    assert "Distill(temperature=2.0" in tree.fingerprint()["distill"]
    # PCQAT: its prune, cluster and QAT nodes all fine-tune distilled
    r = tree.explore(tmp_path / "run", paths=["PCQAT"]).rows[0]
    assert r["verified"] == "yes" and r["unique_max"] <= 8 and r["sparsity"] >= 0.45, r
    assert r["int8_accuracy"] > 0.85, r


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_distill_on_other_backends(backend):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (pip install 'collabopt[{backend}]')")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, str(SCRIPTS / "distill_backend.py")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend and result["teacher_unchanged"]
    assert result["agreement_1.0"] > 0.85, result  # from labels that say nothing
    assert result["sparsity_1.0"] == pytest.approx(0.5, abs=0.01)
