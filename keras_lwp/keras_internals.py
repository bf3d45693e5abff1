"""Every private Keras or TensorFlow name keras_lwp relies on, in one place, with why.

Keras 3's TensorFlow distribution backend is a prototype, so parallelize reaches below the public API.
Each entry below names what is used, where, and why; `check()` reports the ones a Keras or TensorFlow
upgrade moved, and tests/test_keras_internals.py runs it, so an upgrade fails one test with one clear
message instead of changing numbers silently. Accessors here are the only code that touches those
names.

What parallelize changes on a model (keras_lwp.placement, .wrapping, .fit_loop), in one list:
- each weight and each random layer's seed state: its `_value` becomes a dtensor.DVariable, its
  `_layout` the DTensor layout, its class a subclass whose host reads gather and writes shard
  (`_direct_assign`); tensors a layer keeps besides its variables (Normalization's mean and variance)
  become replicated DTensors;
- each layer's `call` (relayout in, its rule's implementation or the original call, relayout out,
  keeping `_keras_logits` and `_keras_mask`), and the model's `call` (outputs split like the labels);
- the model's make_train/test/predict_function (one sharded batch at a time through Keras' own steps)
  and `_maybe_symbolic_build` (fit's and evaluate's tf.data pipelines run without autotuning);
- the optimizer, once a step function is made: `add_variable_from_reference` reset to Keras' own (slots
  on the host, then moved), `assign_add`/`assign_sub` making sparse rows dense, and its variables and
  every metric's moved onto the mesh;
- while a wrapped call is traced, Keras' random draws (keras.src.backend.random) are made whole, and its
  grouped convolutions, roll and slice_update (keras.src.backend.tensorflow) run as ops DTensor runs;
  while a recurrent layer's is, `keras.src.ops.flip` gathers instead of reversing.
"""

# (module, name, kind, used by, why). kind "attribute": a name the module defines (a function, a
# class or a method, read with getattr); kind "set": an instance attribute the module's source sets.
INTERNALS = (
    ("keras.src.ops.function", "_nodes_by_depth", "set", "graph.py",
     "the layer graph of a functional model, in call order"),
    ("keras.src.models.sequential", "_functional", "set", "graph.py",
     "a built Sequential model's functional graph"),
    ("keras.src.ops.node", "arguments", "set", "graph.py, runtime.py, cost/timing.py",
     "a call's arguments, to call a layer again as the model calls it (arguments.fill_in)"),
    ("keras.src.layers.layer", "Layer._flatten_layers", "attribute", "graph.py",
     "the layers a composite layer (a transformer block) is made of"),
    ("keras.src.ops.node", "_keras_history", "set", "graph.py",
     "the layer that made a model input"),
    ("keras.src.backend.tensorflow.core", "_value", "set", "placement.py",
     "the tf.Variable behind a Keras variable, replaced by a DVariable"),
    ("keras.src.backend.tensorflow.core", "Variable._direct_assign", "attribute", "placement.py",
     "host writes to a sharded variable are packed onto the mesh"),
    ("keras.src.trainers.trainer", "Trainer._symbolic_build", "attribute", "fit_loop.py",
     "builds compile metrics and the optimizer before the first step, so their state is put on the mesh"),
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer._maybe_symbolic_build", "attribute", "fit_loop.py",
     "fit and evaluate hand it their epoch iterator before the first epoch: where its pipeline's options are set"),
    ("keras.src.backend.tensorflow.trainer", "_distributed_dataset", "set", "fit_loop.py",
     "the tf.data pipeline an epoch iterator draws from, run without autotuning (its teardown stalled fit)"),
    ("keras.src.backend.tensorflow.random", "_get_concrete_noise_shape", "attribute", "wrapping.py",
     "dropout's mask shape, to draw the single device's mask"),
    ("keras.src.optimizers.base_optimizer", "BaseOptimizer.add_variable_from_reference", "attribute", "placement.py",
     "optimizer slots built on the host (the TF optimizer colocates them with a DVariable, wrongly)"),
    ("keras.src.backend.tensorflow.optimizer", "TFOptimizer.assign_sub", "attribute", "placement.py",
     "sparse rows scatter-subtracted (no DTensor rule): made dense"),
    ("keras.src.ops", "flip", "attribute", "layers/recurrent.py",
     "Bidirectional reverses its backward outputs with ops.flip (ReverseV2): a gather while it is traced"),
    ("keras.src.backend.common.masking", "get_keras_mask", "attribute", "wrapping.py",
     "a tensor's mask (an attribute, or for an eager tensor an entry of a global table)"),
    ("keras.src.backend.common.masking", "set_keras_mask", "attribute", "wrapping.py",
     "a relaid tensor carries the mask of the tensor it was relaid from"),
    ("keras.src.backend", "rnn", "attribute", "layers/recurrent.py",
     "recurrent layers call backend.rnn by attribute: a masked backwards one runs forwards over reversed inputs"),
    ("keras.src.backend.tensorflow.nn", "_get_logits", "attribute", "wrapping.py",
     "cross-entropies read `_keras_logits` or the Softmax/Sigmoid op under the output: kept across relayouts"),
    ("keras.src.backend.tensorflow.nn", "conv", "attribute", "op_rewrites.py",
     "keras.ops.conv calls it by attribute: grouped ones run without XLA while a wrapped call is traced"),
    ("keras.src.backend.tensorflow.nn", "depthwise_conv", "attribute", "op_rewrites.py",
     "keras.ops.depthwise_conv calls it by attribute: a dilated one runs as a sum over its taps"),
    ("keras.src.backend.tensorflow.nn", "separable_conv", "attribute", "op_rewrites.py",
     "keras.ops.separable_conv calls it by attribute: a dilated one runs as taps and a pointwise conv"),
    ("keras.src.backend.tensorflow.numpy", "roll", "attribute", "op_rewrites.py",
     "keras.ops.roll calls it by attribute: a gather instead of Roll while a wrapped call is traced"),
    ("keras.src.backend.tensorflow.numpy", "flip", "attribute", "op_rewrites.py",
     "keras.ops.flip calls it by attribute: a slice with step -1 instead of ReverseV2"),
    ("keras.src.backend.tensorflow.numpy", "tril", "attribute", "op_rewrites.py",
     "keras.ops.tril calls it by attribute: a select instead of MatrixBandPart"),
    ("keras.src.backend.tensorflow.numpy", "triu", "attribute", "op_rewrites.py",
     "keras.ops.triu calls it by attribute: a select instead of MatrixBandPart"),
    ("keras.src.backend.tensorflow.math", "top_k", "attribute", "op_rewrites.py",
     "keras.ops.top_k calls it by attribute: its gradient through a one-hot product, not a scatter"),
    ("keras.src.backend.tensorflow.core", "slice_update", "attribute", "op_rewrites.py",
     "keras.ops.slice_update calls it by attribute: a select instead of XlaDynamicUpdateSlice"),
    ("keras.src.backend.tensorflow.core", "fori_loop", "attribute", "op_rewrites.py",
     "keras.ops.fori_loop calls it by attribute: unrolled instead of a while loop over TensorLists"),
    ("keras.src.backend.tensorflow.core", "scan", "attribute", "op_rewrites.py",
     "keras.ops.scan calls it by attribute: unrolled instead of a while loop over TensorArrays"),
    ("keras.src.backend.tensorflow.core", "map", "attribute", "op_rewrites.py",
     "keras.ops.map calls it by attribute: unrolled instead of tf.map_fn's TensorArrays"),
    ("keras.src.backend.tensorflow.numpy", "cumprod", "attribute", "op_rewrites.py",
     "keras.ops.cumprod calls it by attribute: products over doubling distances instead of Cumprod"),
    ("keras.src.backend.tensorflow.numpy", "diagonal", "attribute", "op_rewrites.py",
     "keras.ops.diagonal calls it by attribute: a gather instead of MatrixDiagPartV3"),
)


def check():
    """The internals missing from the installed Keras: [(module, name, used by, why, what is wrong)]."""
    import importlib
    import inspect

    missing = []
    for module_name, name, kind, used_by, why in INTERNALS:
        try:
            module = importlib.import_module(module_name)
            if kind == "set":
                if f".{name} =" not in inspect.getsource(module):
                    raise AttributeError(f"{module_name} no longer sets .{name}")
            else:
                value = module
                for part in name.split("."):
                    value = getattr(value, part)
        except (ImportError, AttributeError, OSError) as error:
            missing.append((module_name, name, used_by, why, f"{type(error).__name__}: {error}"))
    try:
        from keras.src.backend.tensorflow import nn

        if "_keras_logits" not in inspect.getsource(nn._get_logits):
            missing.append(("keras.src.backend.tensorflow.nn", "_get_logits", "wrapping.py",
                            "the logits kept across relayouts", "it no longer reads _keras_logits"))
        from keras.src.layers.rnn import rnn

        if "backend.rnn(" not in inspect.getsource(rnn.RNN.inner_loop):
            missing.append(("keras.src.layers.rnn.rnn", "RNN.inner_loop", "layers/recurrent.py",
                            "masked backwards recurrences run in order", "it no longer calls backend.rnn by attribute"))
        from keras.src import ops

        # Each backend function op_rewrites swaps: keras.ops must call it by attribute, or the swap is unseen.
        for module_name, name, _, used_by, _ in INTERNALS:
            if used_by != "op_rewrites.py":
                continue
            backend_module = module_name.rsplit(".", 1)[1]  # nn, numpy, core or math, as keras.src.ops names them
            op, call = getattr(getattr(ops, backend_module), name), f"backend.{backend_module}.{name}("
            if call not in inspect.getsource(op):
                missing.append((op.__module__, op.__name__, "op_rewrites.py", "ops DTensor runs, while a wrapped "
                                "call is traced", f"it no longer calls {call[:-1]} by attribute"))
    except (ImportError, AttributeError, OSError):
        pass  # reported above
    return missing


# -- accessors ---------------------------------------------------------------------------------------

def functional_graph(model):
    """(nodes by depth, operations) of a functional model, or None for a model without them."""
    if not hasattr(model, "_nodes_by_depth") or not hasattr(model, "_operations"):
        return None
    return model._nodes_by_depth


def sequential_functional(model):
    """A built Sequential model's inner functional model, or None."""
    return getattr(model, "_functional", None)


def history_layer(tensor):
    """The layer that made a symbolic Keras tensor."""
    return tensor._keras_history.operation


def sublayers(layer):
    """The layers `layer` is made of, nested ones too (none for an operation)."""
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False)) if flatten is not None else []


def keyword_inputs(node):
    """{keyword: index among the node's input tensors} of the tensors a Keras node's call passed by keyword."""
    positions = {id(t): i for i, t in enumerate(node.input_tensors)}
    return {key: positions[id(value)] for key, value in node.arguments.kwargs.items() if id(value) in positions}


def call_arguments(node, tensors):
    """(args, kwargs) of a Keras node's call with its input tensors replaced ({id(tensor): value})."""
    return node.arguments.fill_in(tensors)


def keras_mask(tensor):
    """The mask Keras keeps on a tensor, or None."""
    from keras.src.backend.common import masking

    return masking.get_keras_mask(tensor)


def set_keras_mask(tensor, mask):
    """Keep `mask` on `tensor` as Keras would (None clears it)."""
    from keras.src.backend.common import masking

    masking.set_keras_mask(tensor, mask)


def backing_variable(variable):
    """The tf.Variable (or DVariable) behind a Keras variable."""
    return variable._value


def set_backing_variable(variable, value, layout):
    """Back a Keras variable by `value` (a DVariable) laid out as `layout`; Keras passes `_layout` on
    to the optimizer slots built from the variable."""
    variable._value = value
    variable._layout = layout


def symbolic_build(model, batch):
    """Keras' build of compile metrics and the optimizer from a data batch, before the first step."""
    model._symbolic_build(data_batch=batch)


def maybe_symbolic_build(model, iterator=None, data_batch=None):
    """Keras' own `_maybe_symbolic_build` of the model's class (the instance's is keras_lwp's)."""
    return type(model)._maybe_symbolic_build(model, iterator=iterator, data_batch=data_batch)


def epoch_dataset(iterator):
    """The tf.data pipeline a Keras TF epoch iterator draws from (None for another iterator)."""
    return getattr(iterator, "_distributed_dataset", None)


def set_epoch_dataset(iterator, dataset):
    iterator._distributed_dataset = dataset


def concrete_noise_shape(inputs, noise_shape):
    from keras.src import backend

    return backend.random._get_concrete_noise_shape(inputs, noise_shape)


def backend_module():
    """keras.src.backend, whose functions Keras' layers call by attribute (backend.rnn)."""
    from keras.src import backend

    return backend


def random_module():
    """Keras' random draws by shape, which layers and keras.random call."""
    from keras.src import backend

    return backend.random


def backend_modules_of_ops():
    """keras.src.backend.tensorflow's nn, numpy, core and math: keras.ops (conv, roll, slice_update,
    top_k, ...) call their functions by attribute (op_rewrites.ops_dtensor_runs)."""
    from keras.src.backend.tensorflow import core, math, nn, numpy

    return nn, numpy, core, math


def ops_module():
    """keras.src.ops, whose `flip` Bidirectional calls by attribute (keras_lwp.layers.recurrent)."""
    from keras.src import ops

    return ops


def host_slot_builder():
    """Keras' own add_variable_from_reference (the TF optimizer's colocates slots with a DVariable)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    return BaseOptimizer.add_variable_from_reference
