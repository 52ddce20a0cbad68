"""The one wrapper: a host layer plus a chain of transforms for each optimizable weight.

During ``call`` the wrapper computes every chain's output and temporarily puts that tensor in
place of the host layer's variable, then runs the host layer unchanged. The host layer's own
code (convolution, matmul, padding...) is therefore never re-implemented, and stacking a new
technique means appending a transform to a chain.
"""

from __future__ import annotations

import contextlib

import keras
from keras import ops

from collabopt.core import activations, lowerings, registry
from collabopt.core.transform import Transform


def build_by_calling(layer: keras.layers.Layer, *args, **kwargs) -> None:
    """Build ``layer`` by calling it on symbolic inputs (``keras.KerasTensor``): what builds
    the sublayers of a layer whose own ``build`` does not."""
    from keras.src.backend import compute_output_spec

    compute_output_spec(layer.__call__, *args, **kwargs)


@keras.saving.register_keras_serializable(package="collabopt")
class ActivationRange(keras.layers.Layer):
    """Fake-quantizes activations to int8 with an EMA of their observed range.

    The first training batch sets the range outright (short fine-tunes never recover from an
    arbitrary initial range); later batches move it by ``1 - decay``. The range always contains
    zero, as TFLite requires. ``fixed`` names an activation whose int8 kernel dictates the
    grid (``activations.FIXED_RANGES``): that grid is used and nothing is learned.
    """

    def __init__(self, decay: float = 0.99, fixed: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.decay = float(decay)
        if fixed is not None and fixed not in activations.FIXED_RANGES:
            raise ValueError(f"fixed must be one of {sorted(activations.FIXED_RANGES)}, "
                             f"got {fixed!r}")
        self.fixed = fixed

    def build(self, input_shape=None):
        self.range_min = self.add_weight(
            name="range_min", shape=(), initializer=keras.initializers.Constant(-6.0),
            trainable=False, aggregation="mean", dtype="float32")
        self.range_max = self.add_weight(
            name="range_max", shape=(), initializer=keras.initializers.Constant(6.0),
            trainable=False, aggregation="mean", dtype="float32")
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False,
                                    aggregation="only_first_replica", dtype="float32")
        self.built = True

    def call(self, x, training=False):
        if self.fixed is not None:
            return activations.fixed_fake_quant(x, self.fixed)
        if training:
            x_stop = ops.stop_gradient(ops.cast(x, "float32"))
            batch_min = ops.minimum(ops.min(x_stop), 0.0)
            batch_max = ops.maximum(ops.max(x_stop), 0.0)
            first = ops.equal(self.seen, 0.0)
            d = self.decay
            new_min = ops.where(first, batch_min, d * self.range_min + (1 - d) * batch_min)
            new_max = ops.where(first, batch_max, d * self.range_max + (1 - d) * batch_max)
            self.range_min.assign(new_min)
            self.range_max.assign(new_max)
            self.seen.assign(1.0)
            lo, hi = new_min, new_max
        else:
            lo, hi = self.range_min, self.range_max
        hi = ops.maximum(hi, lo + 1e-6)
        return keras.quantizers.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)

    def get_config(self):
        return {**super().get_config(), "decay": self.decay, "fixed": self.fixed}


@keras.saving.register_keras_serializable(package="collabopt")
class OptimizedLayer(keras.layers.Layer):
    """Host layer + per-weight transform chains (+ optional activation ranges for QAT)."""

    def __init__(self, layer, chains=None, quantize_input=False, quantize_output=False,
                 quantize_inner=False, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(**kwargs)
        self.layer = layer
        chains = chains or {}
        # Flat list (tracked by Keras for saving) plus the weight each transform belongs to.
        self.chain_weights = [name for name, chain in chains.items() for _ in chain]
        self.transforms = [t for chain in chains.values() for t in chain]
        self.quantize_input = bool(quantize_input)
        self.quantize_output = bool(quantize_output)
        # QAT of the int8 tensors TFLite makes inside the host: an activation it does not
        # fuse (the host then runs linear and the activation runs here), or a layer it
        # lowers to several ops (lowerings), which then runs op by op here
        self.lowering = lowerings.get(layer) if quantize_inner else None
        self.quantize_inner = bool(quantize_inner) and (
            self.lowering is not None or activations.unfused(layer))
        self.inner_ranges = [ActivationRange(name=f"inner_range_{i}", dtype="float32")
                             for i in range(self.lowering.inner_tensors if self.lowering else 0)]
        activation = (activations.name_of(layer.activation)
                      if self.quantize_inner and self.lowering is None else None)
        # Ranges run in float32 whatever the mixed-precision policy (int8 ranges need it).
        self.input_range = (ActivationRange(name="input_range", dtype="float32")
                            if quantize_input else None)
        self.preactivation_range = (
            ActivationRange(name="preactivation_range", dtype="float32")
            if activation is not None and not isinstance(layer, keras.layers.Activation)
            else None)
        fixed = activation if activation in activations.FIXED_RANGES else None
        self.output_range = (ActivationRange(name="output_range", dtype="float32", fixed=fixed)
                             if quantize_output else None)

    @property
    def ranges(self) -> dict[str, ActivationRange]:
        found = (("input_range", self.input_range),
                 ("preactivation_range", self.preactivation_range),
                 *((r.name, r) for r in self.inner_ranges), ("output_range", self.output_range))
        return {name: r for name, r in found if r is not None}

    # --- structure ---------------------------------------------------------------------
    @property
    def chains(self) -> dict[str, list[Transform]]:
        out: dict[str, list[Transform]] = {}
        for name, t in zip(self.chain_weights, self.transforms, strict=True):
            out.setdefault(name, []).append(t)
        return out

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if not all(registry.has_weight(self.layer, name) for name in self.chains):
            # a user's block whose build() leaves its sublayers to the first call
            build_by_calling(self.layer, keras.KerasTensor(input_shape))
        self._targets = {}
        for name, chain in self.chains.items():
            owner, attr, var = registry.locate(self.layer, name)
            self._targets[name] = (var, owner, attr)
            for t in chain:
                if not t.built:
                    t.build_for(var.shape)
        # Masks, steps and ranges are state, not parameters: under a distribution strategy
        # every replica computes the same mask and step, and ranges are averaged.
        self.step = self.add_weight(name="step", shape=(), dtype="int32", initializer="zeros",
                                    trainable=False, aggregation="only_first_replica")
        for r in self.ranges.values():
            r.build()
        self.built = True

    def initialize_transforms(self, only: list[Transform] | None = None) -> None:
        """Initialise transforms (all, or ``only`` these newly appended ones) from the value
        their chain feeds them (wrap time)."""
        for chain in self.chains.values():
            name = self.chain_weights[self.transforms.index(chain[0])]
            w = keras.ops.convert_to_numpy(self._targets[name][0].value)
            for t in chain:
                if only is None or any(t is o for o in only):
                    t.initialize(w)
                w = keras.ops.convert_to_numpy(t.apply(ops.convert_to_tensor(w)))

    # --- forward -------------------------------------------------------------------------
    def transformed_weight(self, name: str, training: bool = False, upto_export: bool = False):
        """The chain's output for weight ``name``; ``upto_export`` stops before kept-at-export
        transforms (used by strip to bake the rest into the weight)."""
        var = self._targets[name][0]
        w = ops.copy(var.value)  # a tensor, not the variable itself
        for t in self.chains[name]:
            if upto_export and t.kept_at_export:
                break
            if training:
                t.update(w, self.step.value)
            w = t.apply(w, training=training)
        return w

    def call(self, inputs, *args, training=None, **kwargs):
        training = bool(training)
        if self.input_range is not None:
            inputs = self.input_range(inputs, training=training)
        swapped = {}
        for name in self.chains:
            swapped[name] = self.transformed_weight(name, training=training)
        if training:
            self.step.assign_add(1)
        if self.lowering is not None:
            def q(i, tensor, observe=True):  # observe=False: use the range, learn nothing
                r = self.output_range if i == lowerings.OUTPUT else self.inner_ranges[i]
                return tensor if r is None else r(tensor, training=training and observe)

            with self._weights_in_place(swapped):
                outputs = self.lowering.call(self.layer, inputs, q, *args, training=training,
                                             **kwargs)
            if self.output_range is None or self.lowering.owns_output:
                return outputs
            return self.output_range(outputs, training=training)
        activation = (self.layer.activation if self.quantize_inner and self.lowering is None
                      else None)
        try:
            if activation is not None:
                object.__setattr__(self.layer, "activation", keras.activations.linear)
            with self._weights_in_place(swapped):
                outputs = self.layer(inputs, *args, **kwargs)
        finally:
            if activation is not None:
                object.__setattr__(self.layer, "activation", activation)
        if activation is not None:
            if self.preactivation_range is not None:
                outputs = self.preactivation_range(outputs, training=training)
            name = activations.name_of(activation)
            outputs = activations.quantized(name, activation)(outputs)
        if self.output_range is not None:
            outputs = self.output_range(outputs, training=training)
        return outputs

    @contextlib.contextmanager
    def _weights_in_place(self, swapped: dict):
        """The host (and its sublayers) see the transformed weights for one call."""
        originals = []
        try:
            for name, tensor in swapped.items():
                var, owner, attr = self._targets[name]
                originals.append((owner, attr, var))
                # mixed precision: the host expects its kernel in its compute dtype
                object.__setattr__(owner, attr, ops.cast(tensor, owner.compute_dtype))
            yield
        finally:
            for owner, attr, var in originals:
                object.__setattr__(owner, attr, var)

    def compute_output_spec(self, *args, training=None, **kwargs):
        """Shapes come from the host alone: tracing the weight chains symbolically (each time
        a model is copied) took half of co.cluster's time on MobileNetV2."""
        if training is not None and self.layer._call_has_training_arg:
            kwargs["training"] = training
        return self.layer.compute_output_spec(*args, **kwargs)

    # --- serialization -------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            layer=keras.saving.serialize_keras_object(self.layer),
            chains={name: [keras.saving.serialize_keras_object(t) for t in chain]
                    for name, chain in self.chains.items()},
            quantize_input=self.quantize_input,
            quantize_output=self.quantize_output,
            quantize_inner=self.quantize_inner,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        chains = {name: [keras.saving.deserialize_keras_object(t) for t in chain]
                  for name, chain in config.pop("chains").items()}
        return cls(layer, chains=chains, **config)

    def describe(self) -> str:
        parts = [f"{name}: " + " -> ".join(type(t).__name__ for t in chain)
                 for name, chain in self.chains.items()]
        return f"{self.name} ({type(self.layer).__name__}) " + "; ".join(parts)



@keras.saving.register_keras_serializable(package="collabopt")
class QuantizedOp(keras.layers.Layer):
    """A stateless op of a functional model (``x + 3.0``, ``a * b``) followed by the
    activation range of its output: the converter makes each such op an int8 kernel
    (ADD, MUL, ...), which needs a range like any layer's output."""

    def __init__(self, operation, **kwargs):
        kwargs.setdefault("name", operation.name)
        super().__init__(**kwargs)
        self.operation = operation
        self.output_range = ActivationRange(name="output_range", dtype="float32")
        self.output_range.build()
        self.built = True  # the op may take a constant first (`2.0 - x`): nothing to build

    def __call__(self, *args, **kwargs):
        # Keras layers take only tensors positionally: constants travel by keyword, with
        # their places in the op's argument list (a graph replays the split call as it is)
        if "constants" in kwargs:
            return super().__call__(*args, **kwargs)
        constants = [None if _holds_tensor(a) else a for a in args]
        tensors = [a for a in args if _holds_tensor(a)]
        return super().__call__(*tensors, constants=constants, **kwargs)

    def call(self, *tensors, constants=(), training=None, **kwargs):
        outputs = self.bare_call(*tensors, constants=constants, **kwargs)
        return self.output_range(outputs, training=bool(training))

    def bare_call(self, *tensors, constants=(), **kwargs):
        """The op alone, on the split arguments: what strip puts in its place."""
        given = iter(tensors)
        args = [next(given) if c is None else c for c in constants] or list(tensors)
        return self.operation(*args, **kwargs)

    def compute_output_spec(self, *tensors, constants=(), training=None, **kwargs):
        given = iter(tensors)
        args = [next(given) if c is None else c for c in constants] or list(tensors)
        return self.operation.compute_output_spec(*args, **kwargs)

    @property
    def ranges(self) -> dict[str, ActivationRange]:
        return {"output_range": self.output_range}

    def get_config(self):
        return {**super().get_config(),
                "operation": keras.saving.serialize_keras_object(self.operation)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        operation = keras.saving.deserialize_keras_object(config.pop("operation"))
        return cls(operation, **config)


def _holds_tensor(value) -> bool:
    return any(isinstance(v, keras.KerasTensor) or ops.is_tensor(v)
               for v in keras.tree.flatten(value))
