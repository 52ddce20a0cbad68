"""Knowledge distillation: fine-tunes that also match the uncompressed model's outputs.

A pruned, clustered or quantized model fine-tuned on labels alone relearns only what the
labels say; matching the base model's tempered outputs as well hands it what the base knew
about every class (Hinton et al., 2015). One loss function for any training loop, and one
verb, ``co.distill(model, teacher)``, whose result trains under ``fit`` on every backend:
Keras 3 passes ``x`` to ``compute_loss``, so the teacher runs inside the training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import ops

KINDS = ("auto", "kl", "mse")


@dataclass(frozen=True)
class Distill:
    """How a fine-tune learns from the base: ``weight`` is the teacher term's share of the
    loss (the labels' loss keeps ``1 - weight``); ``kind`` "kl" compares class scores
    softened by ``temperature``, "mse" raw outputs (regression, autoencoders); "auto"
    picks "kl" for outputs with more than one value per sample."""

    temperature: float = 4.0
    weight: float = 0.5
    kind: str = "auto"

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.weight, bool) or not 0 < self.weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {self.weight!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def distillation_loss(student_out, teacher_out, temperature: float = 4.0, kind: str = "kl",
                      from_logits: bool = True):
    """The teacher term for one output. "kl": KL(teacher || student) of the softmax of the
    outputs divided by ``temperature``, times ``temperature**2`` so its gradients keep their
    scale whatever the temperature; probabilities (``from_logits=False``) are taken back to
    log space first. "mse": the mean squared difference. Backend-neutral (``keras.ops``)."""
    teacher_out = ops.stop_gradient(teacher_out)
    if kind == "mse":
        return ops.mean(ops.square(student_out - teacher_out))
    if kind != "kl":
        raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")
    if not from_logits:
        student_out = ops.log(ops.clip(student_out, 1e-7, 1.0))
        teacher_out = ops.log(ops.clip(teacher_out, 1e-7, 1.0))
    log_s = ops.log_softmax(student_out / temperature, axis=-1)
    log_t = ops.log_softmax(teacher_out / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)
    return ops.mean(kl) * (temperature ** 2)


class Distiller(keras.Model):
    """``student`` trained on ``(1 - weight) * labels' loss + weight * teacher term``.

    Compile and fit it like the student; the student's own weights are what it trains (the
    student object itself, so ``co.strip`` and export take it afterwards). The teacher is
    held outside Keras' variable tracking: no optimizer ever sees its weights (a decaying
    optimizer would otherwise shrink them) and it runs in inference mode.
    """

    def __init__(self, student: keras.Model, teacher: keras.Model, config: Distill,
                 from_logits: bool, **kwargs):
        super().__init__(name=f"{student.name}_distilled", **kwargs)
        self.student = student
        object.__setattr__(self, "_teacher", teacher)  # untracked: a constant of the step
        self.config, self.from_logits = config, from_logits

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        hard = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                    training=training)
        teacher = keras.tree.flatten(self._teacher(x, training=False))
        student = keras.tree.flatten(y_pred)
        terms = [distillation_loss(s, t, self.config.temperature,
                                   _kind(self.config.kind, t), self.from_logits)
                 for s, t in zip(student, teacher, strict=True)]
        soft = ops.mean(ops.stack(terms)) if len(terms) > 1 else terms[0]
        w = self.config.weight
        return (1 - w) * hard + w * soft

    def get_config(self):
        raise NotImplementedError("a Distiller is a training wrapper: save its student "
                                  "(distiller.student), which holds the trained weights")


def _kind(kind: str, output) -> str:
    if kind != "auto":
        return kind
    per_sample = 1
    for d in output.shape[1:]:
        per_sample *= int(d)
    return "kl" if per_sample > 1 else "mse"


def _outputs_probabilities(model: keras.Model) -> bool:
    """Whether ``model`` ends in a softmax (its outputs are probabilities, not logits)."""
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def distill(model: keras.Model, teacher: keras.Model, temperature: float = 4.0,
            weight: float = 0.5, kind: str = "auto", from_logits: bool | None = None
            ) -> Distiller:
    """``model`` (pruned, clustered, QAT or plain) wrapped to learn from ``teacher`` too:
    compile and ``fit`` the result; ``model`` holds the trained weights. ``from_logits``
    defaults from the teacher's last layer (a softmax: probabilities)."""
    config = Distill(temperature, weight, kind)
    if from_logits is None:
        from_logits = not _outputs_probabilities(teacher)
    return Distiller(model, teacher, config, bool(from_logits))


__all__ = ["Distill", "Distiller", "distill", "distillation_loss"]
