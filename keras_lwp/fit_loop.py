"""The fit loop: Keras' train/test/predict functions, replaced by ones DTensor can run.

Keras' TF train/test/predict functions wrap steps in `tf.experimental.Optional`, which DTensor cannot
lay out; ours take one batch at a time from the same iterator, shard it along the batch
(`batch_to_mesh`) and run the stock `train_step`/`test_step`/`predict_step` in a `tf.function`. The
optimizer's and the metrics' state is put on the mesh before the first step (`state_to_mesh`): Keras
builds compile metrics lazily inside it, where their variables would stay off the mesh and count wrong.
A batch whose size a mesh axis does not divide (the last partial batch) runs with the sample
dimension replicated along that axis: same numbers, nothing dropped.
"""

import re
import types
import warnings
import weakref

import numpy as np

from keras_lwp import keras_internals, multihost, op_rewrites, placement
from keras_lwp.layers import Placement, dimensions_of

def install_functions(model):
    model.make_train_function = types.MethodType(_make_train_function, model)
    model.make_test_function = types.MethodType(_make_test_function, model)
    model.make_predict_function = types.MethodType(_make_predict_function, model)
    model.train_function = model.test_function = model.predict_function = None


def install_pipeline_options(model):
    """fit's and evaluate's tf.data pipelines without autotuning (see `_maybe_symbolic_build`); also
    on a one-device mesh, whose model otherwise trains as plain Keras."""
    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)


def _maybe_symbolic_build(model, iterator=None, data_batch=None):
    """Keras' own, on an epoch iterator whose tf.data pipeline runs without the autotuning model.

    fit and evaluate call this on their epoch iterator before its first epoch. With autotuning on,
    deleting the iterator after the last step waits on tf.data's background thread: on this 2-core
    machine 5 and 17 s after 2 of 5 keras_lwp fits (about 1 s after some plain Keras fits), none in
    5 of 5 with it off. Off, `map` runs
    as many calls in parallel as there are cores and `prefetch` keeps its own buffer tuning. A
    pipeline whose options set autotuning explicitly keeps them."""
    import tensorflow as tf

    dataset = keras_internals.epoch_dataset(iterator) if iterator is not None else None
    if isinstance(dataset, tf.data.Dataset) and dataset.options().autotune.enabled is None:
        options = tf.data.Options()
        options.autotune.enabled = False
        keras_internals.set_epoch_dataset(iterator, dataset.with_options(options))
    return keras_internals.maybe_symbolic_build(model, iterator=iterator, data_batch=data_batch)


def state_to_mesh(model):
    """The optimizer's and the metrics' variables onto the mesh: slots like their weight, the rest
    replicated."""
    mesh = model._keras_lwp.mesh
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        placement.optimizer_to_mesh(optimizer, model.trainable_variables, mesh)
    placement.variables_to_mesh([v for metric in model.metrics for v in metric.variables], mesh)


def batch_to_mesh(model, data):
    """Shard a batch (x, y, sample_weight) along the sample axis the input layers use."""
    import keras
    import tensorflow as tf

    state = model._keras_lwp
    plan, graph = state.strategy, state.graph
    input_names = graph.graph["inputs"]
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def place(name, value):
        key = (name, len(value.shape))
        if key not in state.input_specs:
            info = graph.nodes[name]["info"]
            configured = Placement(info, dimensions_of(info), plan[name], plan.mesh)
            state.input_specs[key] = configured.output_layout(value)
        return placement.to_mesh(value, state.input_specs[key], state.mesh)

    if isinstance(x, dict):  # named inputs: keys are the input layers' names
        unknown = sorted(set(x) - set(input_names))
        if unknown:
            raise ValueError(f"The data names inputs {unknown} that the model does not have; its inputs are "
                             f"{input_names}. Key the input dict by those names.")
        x = {key: place(key, value) for key, value in x.items()}
    else:
        x = keras.tree.pack_sequence_as(x, [place(n, v) for n, v in zip(input_names, keras.tree.flatten(x))])
    sample_axis = plan[input_names[0]].get("sample")

    def batch_split(value):
        if value is None or not tf.is_tensor(value) and not isinstance(value, np.ndarray):
            return value
        spec = (sample_axis,) + (None,) * (len(value.shape) - 1) if len(value.shape) else ()
        return placement.to_mesh(value, spec, state.mesh)

    y = keras.tree.map_structure(batch_split, y)
    sample_weight = keras.tree.map_structure(batch_split, sample_weight)
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


def _agree_on_batch(model, batch):
    """Multi-client: check that every client feeds this batch (each packs only its own devices'
    blocks of it, so clients with different data would silently train on a mix)."""
    if not multihost.is_multi_client():
        return
    import hashlib

    import keras

    digest = hashlib.sha256()
    for value in keras.tree.flatten(batch):
        if value is None:
            continue
        array = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else np.asarray(value))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    multihost.agree(f"the first batch of an epoch of model '{model.name}'", digest.hexdigest(), advice=(
        "Every client must pass fit/evaluate/predict the whole global batch: the same arrays in the same "
        "order, shuffled with a seed every client shares (keras_lwp.initialize seeds Keras, NumPy and "
        "TensorFlow alike; a tf.data pipeline needs the same seeds on every client too)."))


def _step_function(model, step):
    import tensorflow as tf

    if getattr(model, "jit_compile", False) is True and not getattr(model, "_keras_lwp_warned_jit", False):
        model._keras_lwp_warned_jit = True
        warnings.warn(f"Model '{model.name}' was compiled with jit_compile=True, but its parallelized steps run "
                      "without XLA: TensorFlow DTensor expands them into per-device programs XLA does not compile. "
                      "The numbers are the same; compile with jit_compile=False to silence this.", stacklevel=3)
    def sharded_step(*args):
        # The loss and metrics too (a loss's `y_pred[:, None]` crashed DTensor), not only the layers.
        with op_rewrites.ops_dtensor_runs():
            return step(*args)

    def eager_step(*args):
        # Run eagerly, a tensor a layer makes from nothing (a recurrence's zero initial state) is a host
        # tensor, which DTensor ops refuse beside DTensors; on the mesh's default it is one, replicated.
        from tensorflow.experimental import dtensor

        with dtensor.default_mesh(model._keras_lwp.mesh):
            return sharded_step(*args)

    # No reduce_retracing: a relaxed (None) batch dimension would hide whether the batch divides.
    compiled = eager_step if model.run_eagerly else tf.function(sharded_step)

    def run(*args):
        try:
            return compiled(*args)
        except tf.errors.UnknownError as error:
            refused = re.search(r"'tf\.(\w+)' op does not implement layout propagation", str(error))
            if refused is None and _LAYOUT_CONFLICT.search(str(error)):
                raise NotImplementedError(
                    f"TensorFlow DTensor could not lay out model '{model.name}''s step: {_first_line(error)}. "
                    f"The known cause is a layer made of layers, split by samples, whose own call rearranges "
                    f"the batch axis in a way keras_lwp did not see (it keeps a block that rolls, maps or scans "
                    f"along its batch whole by itself). Layers made of layers this plan splits by samples: "
                    f"{_sample_split_composites(model)}. Pin the one that does so whole "
                    f"(parallelize(..., overrides={{'<its name>': {{}}}})).") from error
            if refused is None:
                raise
            raise NotImplementedError(
                f"Model '{model.name}' runs the TensorFlow op {refused[1]} in its step, and TensorFlow DTensor "
                f"has no layout rule for it, under any plan (replicated too), so keras_lwp cannot run this "
                f"model sharded. Train the model without keras_lwp.parallelize, or replace the call that makes "
                f"this op in its layer. (keras_lwp refuses the layers that use the ops it knows of before it "
                f"changes anything: keras_lwp.runtime.UNRUNNABLE_OPS lacks this one.)") from error

    return run


# What DTensor raises when its layout propagation contradicts a relayout or an op's expansion.
_LAYOUT_CONFLICT = re.compile(r"output layout of Relayout op after layout propagation does not match|"
                              r"SPMD expansion resulted in op output inconsistent with the provided layout")


def _first_line(error):
    return str(error).strip().splitlines()[0][:300]


def _sample_split_composites(model):
    from keras_lwp.layers import is_composite
    from keras_lwp.runtime import strategy_of

    plan, state = strategy_of(model), getattr(model, "_keras_lwp", None)
    graph = getattr(state, "graph", None)
    if plan is None or graph is None:
        return "unknown"
    names = [name for name in plan if name in graph and "sample" in dict(plan[name])
             and is_composite(graph.nodes[name]["info"])]
    return ", ".join(repr(name) for name in names) or "none"


def _make_train_function(model, force=False):
    if model.train_function is not None and not force:
        return model.train_function
    model.train_function = _stepper(model, model.train_step)
    return model.train_function


def _make_test_function(model, force=False):
    if model.test_function is not None and not force:
        return model.test_function
    model.test_function = _stepper(model, model.test_step)
    return model.test_function


def _stepper(model, step_function):
    """A Keras train/test function: one sharded batch at a time through Keras' own step.

    The step returns the metric results as replicated DTensors, so no host copy. DTensor dispatches
    a step asynchronously, so the next batch is taken and packed onto the mesh while the current
    step runs; it is kept for the next call on the same iterator (Keras keeps one iterator across
    epochs when steps_per_epoch is set)."""
    import tensorflow as tf

    step = _step_function(model, step_function)
    ready = []
    checked = []  # a weak reference to the iterator whose first batch the clients compared (multi-client)
    pending = []  # [iterator, its next batch packed (None if packing failed), the batch]

    def take(iterator):
        if pending:
            source, packed, batch = pending
            pending.clear()  # also drops a batch prefetched from an iterator Keras has let go
            if source is iterator:
                return packed if packed is not None else batch_to_mesh(model, batch)
        batch = next(iterator)
        if multihost.is_multi_client() and (not checked or checked[0]() is not iterator):
            checked[:] = [_weak(iterator)]  # its first batch (an epoch's): every client must feed the same
            _agree_on_batch(model, batch)
        if not ready:
            # Keras builds compile metrics lazily inside the first step; built there, their
            # variables would not be on the mesh (accuracy's count came out 7x too large).
            if getattr(model, "optimizer", None) is not None and not model.optimizer.built:
                placement.host_slots(model.optimizer)
            keras_internals.symbolic_build(model, batch)
            state_to_mesh(model)
            ready.append(True)
        return batch_to_mesh(model, batch)

    def prefetch(iterator):
        try:
            batch = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            return  # the next call's next() raises it again, where Keras expects it
        try:
            pending[:] = [iterator, batch_to_mesh(model, batch), batch]
        except Exception:  # take() packs it again and raises at its own step
            pending[:] = [iterator, None, batch]

    def function(iterator):
        # Like Keras' own: an execution the data ends inside returns the steps it ran (its callbacks
        # follow); the next call, with nothing left, ends the epoch.
        logs = None
        for _ in range(model.steps_per_execution):
            try:
                batch = take(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                if logs is None:
                    raise
                break
            logs = step(batch)
            prefetch(iterator)
        return logs

    return function


def _weak(value):
    """A weak reference to `value`, or a strong one for objects that take none (a list iterator)."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


def _make_predict_function(model, force=False):
    import keras

    if model.predict_function is not None and not force:
        return model.predict_function
    step = _step_function(model, model.predict_step)

    def function(data):
        outputs = []
        for batch in data:
            if not outputs:
                _agree_on_batch(model, batch)
            outputs.append(keras.tree.map_structure(placement.to_host, step(batch_to_mesh(model, batch))))
        if len(outputs) == 1:
            return outputs[0]
        return keras.tree.map_structure(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *outputs)

    model.predict_function = function
    return function


__all__ = ["batch_to_mesh", "install_functions", "install_pipeline_options", "state_to_mesh"]
