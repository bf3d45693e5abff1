"""Timing on the devices: what the profiled cost model (keras_lwp.cost.profiled) measures, and how.

A `DeviceTimer` runs things on a mesh the way `parallelize` runs them (keras_lwp.placement puts the
weights and inputs there, keras_lwp.wrapping wraps the layer's call) and returns seconds:
- `layer`: a copy of a layer under a configuration, forward and backward, in one `tf.function`;
- `batch_packing`: a batch packed onto the mesh in an input's layout (fit does it every step);
- `update`: the optimizer's update of a layer's weights in their layouts;
- `fit_step`: a `fit` step of a one-Dense model (what a step costs besides its layers);
- `baseline`: an empty call over the same number of arguments (subtracted from the others).
Everything here runs TensorFlow; the cost arithmetic and the cache stay in keras_lwp.cost.profiled.
"""

import gc
import time

import numpy as np

from keras_lwp import keras_internals, placement, wrapping
from keras_lwp.cost.devices import get_profile
from keras_lwp.cost.volume import is_float
from keras_lwp.mesh import mesh_spec_of

DEFAULT_OPTIMIZER = "adam"


class ProfileError(Exception):
    """A layer configuration could not be run on its own (the analytic estimate is used instead)."""


def block(outputs):
    """Wait until every tensor in `outputs` (DTensors too) is computed: a DTensor step is dispatched
    asynchronously. Reading each device's component is a view on CPU, not a copy."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    for tensor in tf.nest.flatten(outputs, expand_composites=True):
        if tensor is None or not tf.is_tensor(tensor):
            continue
        if dtensor.is_dtensor(tensor):
            for component in dtensor.unpack(tensor):
                component.numpy()
        else:
            tensor.numpy()


def steady(samples):
    """The statistic kept of repeated timings: the fastest. Other work on the machine (other
    processes on shared cores) can only make a round slower, so the fastest round is the best
    estimate of what the layer costs on its own, and the least sensitive to that work coming and
    going between the profile and the training it predicts."""
    return min(samples)


def time_call(fn, args=(), rounds=5, target=0.05, max_calls=50):
    """Seconds per call of `fn(*args)`, dispatch and execution: one call to trace, one to warm up
    and size the rounds, then `rounds` rounds of calls (each round lasting about `target` seconds);
    `steady` of the rounds. A round averages several calls: the fastest of single calls of a
    multi-threaded step was off by up to 30% (a transformer's attention layer measured 4% low on
    one mesh and 30% high on the other, enough to reorder its plans). Every call is waited for
    before the next: overlapping a call's execution with the next one's dispatch would hide a small
    layer's work behind the Python overhead of calling it, which a training step pays once, not per
    layer (the empty call's time, timed the same way, is subtracted). Slow functions (over 0.1 s a
    call) get three rounds of one call."""
    block(fn(*args))
    start = time.perf_counter()
    block(fn(*args))
    once = time.perf_counter() - start
    calls = int(min(max_calls, max(1, round(target / max(once, 1e-6)))))
    if once > 0.1:
        rounds = min(rounds, 3)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            block(fn(*args))
        samples.append((time.perf_counter() - start) / calls)
    return steady(samples)


def fresh_optimizer(spec):
    """A fresh Keras optimizer like `spec` (an optimizer, a name, or None for Adam)."""
    import keras

    if spec is None:
        spec = DEFAULT_OPTIMIZER
    if isinstance(spec, str):
        return keras.optimizers.get(spec)
    return type(spec).from_config(spec.get_config())


class DeviceTimer:
    """Seconds of things run on `dmesh` (a dtensor.Mesh), `rounds` timed rounds each (see `time_call`)."""

    def __init__(self, dmesh, rounds=5):
        self.dmesh = dmesh
        self.spec = mesh_spec_of(dmesh)
        self.rounds = rounds
        self._baselines = {}  # number of arguments -> seconds of an empty call

    def baseline(self, count):
        """Seconds of a call to a tf.function that returns its `count` mesh arguments untouched."""
        if count not in self._baselines:
            import tensorflow as tf

            # One op per argument, so the function runs on every device like the layer's does.
            args = [placement.to_mesh(np.zeros((self.spec.size,), "float32"), (None,), self.dmesh) for _ in range(count)]
            empty = tf.function(lambda *xs: [tf.identity(x) for x in xs])
            self._baselines[count] = time_call(empty, args, max(self.rounds, 7))
        return self._baselines[count]

    def layer(self, info, place):
        """Seconds per call of the layer's forward + backward under `place`, less an empty call's."""
        import tensorflow as tf

        try:
            step, args = self._layer_step(info, place)
            seconds = time_call(step, args, self.rounds)
        finally:
            _collect_if_large(info, self.spec)  # the layer's copy, on every device
        return max(seconds - self.baseline(len(tf.nest.flatten(args))), 0.0)

    def _layer_step(self, info, place):
        """A tf.function running the layer forward and backward under `place` as `parallelize` runs
        it, and its mesh arguments."""
        import keras
        import tensorflow as tf

        if any(call.node is None for call in info.calls) or info.layer is None:
            raise ProfileError("the layer graph does not say how the model calls it")
        try:
            clone = type(info.layer).from_config(info.layer.get_config())
        except Exception as error:  # noqa: BLE001
            raise ProfileError(f"the layer cannot be rebuilt from its config ({error})") from error
        call = info.calls[0]
        symbolic = {id(t): keras.KerasTensor(i.shape, i.dtype) for t, i in zip(call.node.input_tensors, call.inputs)}
        args, kwargs = keras_internals.call_arguments(call.node, symbolic)
        clone(*args, **kwargs)  # builds the weights
        if len(clone.weights) != len(info.weights):
            raise ProfileError("the rebuilt layer has different weights")
        placement.layer_to_mesh(clone, place, self.dmesh)
        wrapping.wrap_call(clone, place, self.dmesh)
        training = "training" in getattr(clone, "_call_context_args", ())
        inputs = [[placement.to_mesh(host_value(t, info), place.input_layout(i, t), self.dmesh)
                   for i, t in enumerate(c.inputs)] for c in info.calls]
        grads = [[placement.to_mesh(host_value(t, info), place.output_layout(t), self.dmesh)
                  for t in c.outputs if is_float(t.dtype)] for c in info.calls]
        calls = info.calls

        @tf.function
        def step(inputs, grads):
            results = []
            for c, xs, dys in zip(calls, inputs, grads):
                # Only the inputs training differentiates (not the model's own inputs).
                floats = [x for x, needed in zip(xs, input_gradients(c)) if needed]
                with tf.GradientTape() as tape:
                    for x in floats:
                        tape.watch(x)
                    a, k = keras_internals.call_arguments(c.node, {id(t): x for t, x in zip(c.node.input_tensors, xs)})
                    if training:
                        k = dict(k, training=True)
                    out = clone(*a, **k)
                outs = [o for o, t in zip(keras.tree.flatten(out), c.outputs) if is_float(t.dtype)]
                sources = floats + list(clone.trainable_variables)
                gradients = tape.gradient(outs, sources, output_gradients=dys) if outs and sources else []
                results.extend(g for g in gradients if g is not None)
                if not results:
                    results.extend(keras.tree.flatten(out))
            return results

        return step, (inputs, grads)

    def batch_packing(self, info, place):
        """A batch packed onto the mesh in the input's layout (fit does it every step)."""
        import tensorflow as tf

        value = tf.constant(host_value(info.output, info))
        layout = place.output_layout(info.output)
        return time_call(lambda: placement.to_mesh(value, layout, self.dmesh), (), self.rounds)

    def update(self, info, place, optimizer):
        """Seconds of `optimizer`'s (see `fresh_optimizer`) update of the layer's trainable weights in
        their layouts, less an empty call's."""
        import keras
        import tensorflow as tf

        weights = [(w, place.weight_layout(i)) for i, w in enumerate(info.weights) if w.trainable]
        variables = []
        for weight, layout in weights:
            variable = keras.Variable(np.zeros(weight.shape, weight.dtype), dtype=weight.dtype,
                                      name=weight.name.rsplit("/", 1)[-1])
            placement.variable_to_mesh(variable, layout, self.dmesh)
            variables.append(variable)
        optimizer = fresh_optimizer(optimizer)
        placement.optimizer_to_mesh(optimizer, variables, self.dmesh)
        gradients = [placement.to_mesh(np.full(w.shape, 1e-3, w.dtype), layout, self.dmesh) for w, layout in weights]

        # The optimizer's own update of each weight. Not `optimizer.apply`: run inside a tf.function
        # through tf.distribute's default strategy, it kept every variable it updated alive after
        # the function and the optimizer were gone (1 GB per AlexNet-sized layer).
        @tf.function
        def update(gradients):
            for gradient, variable in zip(gradients, variables):
                optimizer.update_step(gradient, variable, tf.cast(optimizer.learning_rate, variable.dtype))
            optimizer.iterations.assign_add(1)
            # Not the weights: a read of them still held at the next update would make that update
            # copy every weight first (copy-on-write), which a training step does not do.
            return optimizer.iterations.value

        seconds = time_call(update, (gradients,), self.rounds) - self.baseline(len(gradients))
        _collect_if_large(info, self.spec)  # the variables and slots just made, on every device
        return max(seconds, 0.0)

    def fit_step(self, optimizer, batch, steps=10, epochs=5, model=None):
        """Seconds per `fit` step of `model` (default a one-Dense model: a step's cost besides its
        layers, once its layers' are taken off) parallelized "data" on this mesh (a 1-D mesh), and
        that model's layer graph."""
        import keras

        from keras_lwp.graph import layer_graph
        from keras_lwp.runtime import parallelize  # the real fit loop is what is timed

        if model is None:
            inputs = keras.Input((1,), name="keras_lwp_probe_input")
            model = keras.Model(inputs, keras.layers.Dense(2, name="keras_lwp_probe_dense")(inputs))
        graph = layer_graph(model, batch)
        # A profile given: "data" needs no calibration (which times this very step).
        parallelize(model, self.dmesh, strategy="data", batch_size=batch, profile=get_profile(None, self.spec))
        model.compile(fresh_optimizer(optimizer), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.zeros((batch * steps,) + tuple(model.input_shape[1:]), "float32")
        y = np.zeros((batch * steps,), "int32")

        class EpochTimer(keras.callbacks.Callback):
            """From the first step's start (after fit made the epoch's data iterator) to the epoch's
            end (after fit read the last step's results)."""

            def on_train_batch_begin(self, batch, logs=None):
                if batch == 0:
                    self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                seconds.append((time.perf_counter() - self.start) / steps)

        seconds = []
        # Arrays, as most fit calls get; one call, the first epoch traces and warms up. The timer leaves
        # out making and dropping the epoch's data iterator (a cost per epoch, not per step).
        model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[EpochTimer()])
        return steady(seconds[1:]), graph


def input_gradients(call):
    """Per input of a call, whether training computes its gradient (float inputs with trainable
    weights upstream; every float input when the graph did not say)."""
    floats = [is_float(t.dtype) for t in call.inputs]
    if len(call.input_gradients) != len(floats):
        return floats
    return [f and bool(g) for f, g in zip(floats, call.input_gradients)]


def _collect_if_large(info, mesh):
    """Free a measured layer's copies now when they are large: Keras layers and optimizers hold
    reference cycles, so their DVariables (the weights on every device) otherwise wait for the
    garbage collector, and a training step slows down while gigabytes of them linger."""
    if sum(w.nbytes for w in info.weights) * mesh.size > 64 * 2**20:
        gc.collect()


def host_value(tensor, info):
    """Data of a tensor's shape and dtype: normal floats, integer ids valid for an Embedding."""
    rng = np.random.default_rng(0)
    if is_float(tensor.dtype):
        return rng.standard_normal(tensor.shape).astype(tensor.dtype)
    high = int(info.config.get("input_dim", 2)) if info.class_name == "Embedding" else 2
    return rng.integers(0, high, tensor.shape).astype(tensor.dtype)


__all__ = ["DeviceTimer", "ProfileError", "block", "fresh_optimizer", "host_value", "input_gradients", "steady", "time_call"]
