"""Model rewriting: copy a model with some layers replaced, whatever way it was built.

Sequential and Functional models (nested ones included, shared layers kept shared) go
through ``keras.models.clone_model``; subclassed models are rebuilt from their config (or
their constructor, for ``__init__(self)`` without ``get_config``) and the layers held as
attributes are swapped. How the user compiled the model never matters: the copy is compiled
the same way when that serializes, and returned uncompiled otherwise. The input model is
never touched: every layer of the result is a fresh copy carrying the same weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import keras

from collabopt.core import registry
from collabopt.core.wrapper import OptimizedLayer, QuantizedOp, build_by_calling

LayerSelector = str | type | Callable[[keras.layers.Layer], bool] | Iterable[str | type] | None


def copy_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A fresh, built copy of ``layer`` with the same config and weights."""
    from collabopt.core.transform import Transform

    if isinstance(layer, Transform):
        new = layer.__class__.from_config(layer.get_config())
        new.build_for(layer.weight_shape)
        new.set_weights(layer.get_weights())
        return new
    if isinstance(layer, OptimizedLayer):
        new = OptimizedLayer.from_config(layer.get_config())
    else:
        new = layer.__class__.from_config(layer.get_config())
    if layer.built:
        build_config = layer.get_build_config()
        if build_config:
            new.build_from_config(build_config)
        if len(new.weights) != len(layer.weights):
            _build_by_calling(new, layer)
        new.set_weights(layer.get_weights())
    return new


def _build_by_calling(new: keras.layers.Layer, layer: keras.layers.Layer) -> None:
    """Build a copy whose ``build`` does not create its sublayers' weights (a user's block
    that builds them on first call) by calling it on symbolic inputs like the original's."""
    shapes = (layer.get_build_config() or {}).get("input_shape")
    if shapes is not None:
        args = keras.tree.map_shape_structure(lambda s: keras.KerasTensor(s), shapes)
        args, kwargs = ((args,) if not isinstance(args, list) else tuple(args)), {}
    elif layer._inbound_nodes:
        node = layer._inbound_nodes[0]
        args, kwargs = keras.tree.map_structure(
            lambda t: keras.KerasTensor(t.shape, t.dtype) if isinstance(t, keras.KerasTensor)
            else t, (node.arguments.args, node.arguments.kwargs))
    else:
        raise ValueError(
            f"cannot copy layer {layer.name!r} ({type(layer).__name__}): its build() does "
            "not create its weights and it was never called; call the model on data first")
    build_by_calling(new, *args, **kwargs)


def ensure_built(model: keras.Model) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"model {model.name!r} is not built: call it on data or build it with "
            "model.build(input_shape) (or give it an Input) before optimizing it.")


def iter_layers(model: keras.Model):
    """Every leaf layer of ``model`` (recursing into nested models), each once."""
    seen = set()
    stack = list(reversed(_children(model)))
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.Model) and not isinstance(layer, OptimizedLayer):
            stack.extend(reversed(_children(layer)))
        else:
            yield layer


def _children(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _is_functional_like(model) -> bool:
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def rewrite(model: keras.Model,
            replace: Callable[[keras.layers.Layer], keras.layers.Layer | None],
            replace_op: Callable[[object], keras.layers.Layer | None] | None = None,
            ) -> keras.Model:
    """Copy ``model``; each leaf layer becomes ``replace(layer)`` or, if None, a plain copy;
    each stateless op of a functional graph (``x * 2.0``) ``replace_op(op)`` or itself."""

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):  # a stateless op such as `x * 2.0`
            new = replace_op(layer) if replace_op is not None else None
            return layer if new is None else new
        if isinstance(layer, keras.layers.InputLayer):
            return layer.__class__.from_config(layer.get_config())
        if isinstance(layer, keras.Model) and not isinstance(layer, OptimizedLayer):
            return rewrite(layer, replace, replace_op)
        new = replace(layer)
        return copy_layer(layer) if new is None else new

    if _is_functional_like(model):
        inputs = None
        if not isinstance(model, keras.Sequential) and getattr(model, "inputs", None):
            inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype,
                                  name=t._keras_history.operation.name) for t in model.inputs]
            struct = getattr(model, "_inputs_struct", None)  # Model([x], ...) keeps a list
            inputs = (keras.tree.pack_sequence_as(struct, inputs) if struct is not None
                      else inputs[0] if len(inputs) == 1 else inputs)
        compiled = getattr(model, "compiled", False)
        model.compiled = False  # clone_model would re-compile the copy, failing on lambdas
        try:
            out = keras.models.clone_model(model, clone_function=clone, recursive=False,
                                           input_tensors=inputs)
        finally:
            model.compiled = compiled
        if not out.built and model.built:
            out.build_from_config(model.get_build_config())
        _compile_like(out, model)
        return out
    return _rewrite_subclassed(model, clone)


def _new_instance(model: keras.Model) -> keras.Model:
    """A fresh instance of a subclassed model's class: from its config, or, for the common
    ``def __init__(self): super().__init__()`` without ``get_config``, from the constructor
    arguments Keras recorded (none for that pattern)."""
    cls = model.__class__
    try:
        config = keras.saving.serialize_keras_object(model)
        return keras.saving.deserialize_keras_object(
            config, custom_objects={cls.__name__: cls})
    except Exception as err:  # noqa: BLE001 - try the constructor, then say what to do
        first = err
    import inspect

    auto = getattr(model, "_auto_config", None)
    recorded = dict(getattr(auto, "config", None) or {})
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in recorded.items() if takes_any or k in params}
    try:
        return cls(**args)
    except Exception as err:  # noqa: BLE001 - we re-raise with the fix the user needs
        raise ValueError(
            f"cannot copy subclassed model {cls.__name__}: neither its config ({first}) nor "
            f"{cls.__name__}({', '.join(args)}) builds a new one ({err}). Give it "
            "get_config() returning its constructor arguments.") from err


def _compile_like(new: keras.Model, model: keras.Model) -> None:
    """Compile the copy as the original was when its compile settings serialize; a copy of
    a model compiled with a lambda or an unregistered loss is returned uncompiled."""
    if not getattr(model, "compiled", False):
        return
    try:
        new.compile_from_config(model.get_compile_config())
    except Exception:  # noqa: BLE001 - any failure here only means "compile it yourself"
        new.compiled = False


def _rewrite_subclassed(model: keras.Model, clone) -> keras.Model:
    """Rebuild a subclassed model from its config, then put a clone of each layer the
    original holds as an attribute (or in a list attribute) in the same place."""
    new = _new_instance(model)
    if not getattr(model, "_call_has_training_arg", True):
        warnings.warn(
            f"{type(model).__name__}.call takes no `training` argument, so Keras runs its "
            "layers in inference mode during fit: pruning masks and QAT ranges would never "
            "update. Add `training=None` to its call signature.", stacklevel=3)
    cache: dict[int, keras.layers.Layer] = {}
    replaced: dict[int, keras.layers.Layer] = {}

    def cloned(item):
        if id(item) not in cache:
            cache[id(item)] = clone(item)
        return cache[id(item)]

    for attr, value in vars(model).items():
        if attr.startswith("_"):
            continue
        old_new = getattr(new, attr, None)
        if isinstance(value, keras.layers.Layer):
            object.__setattr__(new, attr, cloned(value))
            if old_new is not None:
                replaced[id(old_new)] = cache[id(value)]
        elif isinstance(value, list) and any(isinstance(v, keras.layers.Layer) for v in value):
            items = [cloned(v) if isinstance(v, keras.layers.Layer) else v for v in value]
            for before, after in zip(old_new or [], items, strict=False):
                replaced[id(before)] = after
            object.__setattr__(new, attr, items)
    new._layers[:] = [replaced.get(id(layer), layer) for layer in new._layers]
    new.built = True
    if getattr(model, "_called", False):  # export takes its input signature from the call
        new._build_shapes_dict = model._build_shapes_dict
        new._called = True
    _compile_like(new, model)
    return new


# --- selection ---------------------------------------------------------------------------
def layer_matcher(layers: LayerSelector):
    """The selector as (a predicate, or None for every layer; the names it spells out)."""
    if layers is None:
        return None, set()
    if callable(layers) and not isinstance(layers, type):
        # a predicate selects softly: matched layers the registry cannot handle are skipped
        return (lambda layer: "soft" if layers(layer) else False), set()
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    names = {i for i in items if isinstance(i, str)}
    classes = tuple(i for i in items if isinstance(i, type))
    bad = [i for i in items if not isinstance(i, (str, type))]
    if bad:
        raise TypeError(f"layers= takes names, classes or a predicate; got {bad!r}")
    return (lambda layer: layer.name in names or (classes and isinstance(layer, classes))), names


@dataclass(frozen=True)
class AllExcept:
    """Selects every layer but those named, by layer name or class name ("DepthwiseConv2D"):
    what a config file can say. Its repr is stable, so a run's fingerprint can hold it."""

    skip: tuple[str, ...]

    def __call__(self, layer: keras.layers.Layer) -> bool:
        kinds = {cls.__name__ for cls in type(layer).__mro__}
        return layer.name not in self.skip and not kinds.intersection(self.skip)

    def unknown(self, model: keras.Model) -> list[str]:
        """Entries that match no layer of ``model`` (most likely typos)."""
        known = set()
        for layer in model._flatten_layers(include_self=False):
            known.add(layer.name)
            known.update(cls.__name__ for cls in type(layer).__mro__)
        return [s for s in self.skip if s not in known]


@dataclass
class Summary:
    """What an entry point wrapped and what it skipped, and why."""

    action: str
    wrapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for name, why in self.skipped.items():
            by_reason.setdefault(why, []).append(name)

        def group(why, names):
            if len(names) == 1:
                return f"{names[0]} ({why})"
            more = ", ..." if len(names) > 3 else ""
            return f"{len(names)} layers ({why}: {', '.join(names[:3])}{more})"

        skipped = ", ".join(group(why, names) for why, names in by_reason.items()) or "none"
        return (f"collabopt.{self.action}: wrapped {len(self.wrapped)} layer(s) "
                f"[{', '.join(self.wrapped)}]; skipped: {skipped}")


def apply_to_model(
    model: keras.Model,
    action: str,
    make_chains: Callable[[keras.layers.Layer, list[registry.WeightSpec], bool],
                          dict | str],
    layers: LayerSelector = None,
    verbose: bool = True,
    min_weights: int = 32,
    wrap_other: Callable[[keras.layers.Layer], tuple[dict, dict] | None] | None = None,
    wrap_op: Callable[[object], keras.layers.Layer | None] | None = None,
) -> keras.Model:
    """Shared engine of prune/cluster/quantize: select layers, wrap them, report.

    ``make_chains(layer, specs, explicit)`` returns ``{weight name: [transforms]}`` (optionally
    with a dict of wrapper options, as a pair) or a string saying why the layer is skipped.
    ``explicit`` is True when the user named the layer, in which case a skip reason becomes a
    ValueError. ``wrap_other(layer)`` may wrap layers outside the registry (QAT activation
    ranges) by returning ``(chains, options)``; ``wrap_op(op)`` may replace a stateless op of
    a functional graph by a layer.
    """
    ensure_built(model)
    match, names = layer_matcher(layers)
    all_layers = list(iter_layers(model))
    missing = names - {layer.name for layer in all_layers}
    if missing:
        raise ValueError(f"layers= names {sorted(missing)} not found in model {model.name!r}; "
                         f"its layers are {[layer.name for layer in all_layers]}")
    summary = Summary(action)

    def replace(layer):
        selected = match(layer) if match is not None else True
        if not selected:
            return None
        explicit = match is not None and selected != "soft"
        base = host_layer(layer)
        specs = registry.weight_specs(base)
        if specs is None and wrap_other is not None:
            other = wrap_other(layer)
            if other is not None:
                return wrap(layer, other[0], **other[1])
            if not base.weights:
                return None
        if specs is None:
            if explicit:
                raise ValueError(
                    f"layer {layer.name!r} ({type(base).__name__}) is not supported by "
                    f"collabopt.{action}: no registry entry says which of its weights to "
                    "optimize. Leave it out of layers=.")
            if base.weights:
                summary.skipped[layer.name] = f"{type(base).__name__} not in registry"
            return None
        size = sum(int(registry.find_variable(base, s.name).numpy().size) for s in specs)
        if size < min_weights and not explicit:
            summary.skipped[layer.name] = f"only {size} weights"
            return None
        chains = make_chains(layer, list(specs), explicit)
        options = {}
        if isinstance(chains, tuple):
            chains, options = chains
        if isinstance(chains, str):
            if explicit:
                raise ValueError(f"collabopt.{action} cannot handle layer {layer.name!r}: "
                                 f"{chains}")
            summary.skipped[layer.name] = chains
            return None
        wrapped = wrap(layer, chains, **options)
        summary.wrapped.append(layer.name)
        return wrapped

    result = rewrite(model, replace, wrap_op)
    if not summary.wrapped:
        raise ValueError(
            f"collabopt.{action}: nothing to optimize in model {model.name!r}. "
            f"Skipped: {dict(summary.skipped) or 'no layer with weights'}")
    if verbose:
        print(summary)
    result.collabopt_summary = summary
    return result


def wrap(layer: keras.layers.Layer, chains: dict, **options) -> OptimizedLayer:
    """Wrap a copy of ``layer`` (appending to its chains when it is already wrapped)."""
    if isinstance(layer, OptimizedLayer):
        merged = {name: list(chain) for name, chain in copy_layer(layer).chains.items()}
        for name, chain in chains.items():
            merged.setdefault(name, []).extend(chain)
        options = {"quantize_input": layer.quantize_input,
                   "quantize_output": layer.quantize_output,
                   "quantize_inner": layer.quantize_inner, **options}
        new = OptimizedLayer(copy_layer(layer.layer), merged, **options)
        new.build(input_shape(layer))
        new.step.assign(layer.step.value)  # copies carry host weights and old transform state
        new.initialize_transforms(only=[t for chain in chains.values() for t in chain])
        return new
    host = copy_layer(layer)
    new = OptimizedLayer(host, chains, **options)
    try:
        shape = input_shape(layer)
    except ValueError:
        if chains:
            raise
        return new  # weightless, inside a subclassed model: built by its first call
    new.build(shape)
    new.initialize_transforms()
    return new


def host_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """The Keras layer that holds the weights: the wrapped one for an OptimizedLayer."""
    return layer.layer if isinstance(layer, OptimizedLayer) else layer


def input_shape(layer: keras.layers.Layer):
    """The input shape a layer was built with (from its build config or its first call)."""
    config = layer.get_build_config() or {}
    if config.get("input_shape") is not None:
        return config["input_shape"]
    if layer._inbound_nodes:
        shapes = [tuple(t.shape) for t in layer._inbound_nodes[0].input_tensors]
        return shapes[0] if len(shapes) == 1 else shapes
    if isinstance(layer, OptimizedLayer):
        return input_shape(layer.layer)
    raise ValueError(f"cannot tell the input shape of layer {layer.name!r}: build it first")


def current_weight(layer: keras.layers.Layer, name: str) -> np.ndarray:  # noqa: F821
    """The value a weight currently has in the forward pass (its chain output if wrapped)."""
    if isinstance(layer, OptimizedLayer):
        return keras.ops.convert_to_numpy(layer.transformed_weight(name))
    return registry.find_variable(layer, name).numpy()


# --- strip -------------------------------------------------------------------------------
def strip(model: keras.Model, keep_quantization: bool = False) -> keras.Model:
    """A plain Keras model: every wrapper replaced by its host layer with baked weights.

    With ``keep_quantization=True`` (used by export) QAT wrappers stay, reduced to their
    fake-quant transforms and activation ranges, so the converter sees the learned ranges.
    """

    def replace(layer):
        if isinstance(layer, QuantizedOp):
            return copy_layer(layer) if keep_quantization else layer.bare_call
        if not isinstance(layer, OptimizedLayer):
            return None
        host = copy_layer(layer.layer)
        for name in layer.chains:
            var = registry.find_variable(host, name)
            var.assign(keras.ops.convert_to_numpy(
                layer.transformed_weight(name, upto_export=True)))
        quantized = any(t.kept_at_export for t in layer.transforms) or bool(layer.ranges)
        if not (keep_quantization and quantized):
            return host
        kept = {name: [copy_layer(t) for t in chain if t.kept_at_export]
                for name, chain in layer.chains.items()}
        kept = {name: chain for name, chain in kept.items() if chain}
        new = OptimizedLayer(host, kept, quantize_input=layer.quantize_input,
                             quantize_output=layer.quantize_output,
                             quantize_inner=layer.quantize_inner)
        new.build(input_shape(layer))
        for name, r in layer.ranges.items():
            new.ranges[name].set_weights(r.get_weights())
        return new

    return rewrite(model, replace)


def is_wrapped(model: keras.Model) -> bool:
    return any(isinstance(layer, OptimizedLayer) for layer in iter_layers(model))
