"""Every runnable configuration of every layer rule, on real DTensor, equals the unsharded layer.

For each registered layer class (Conv1D/Conv2D: tests/test_hidden_conv.py) a representative layer is
built on inputs whose every dimension a 2-way mesh axis divides, and every configuration that
`parallelize` can run on the 2x2x2 mesh of logical CPUs (`configurations(info, runnable_dims(dims),
mesh)`), one per permutation class of the mesh axes plus any needed to split every dimension
along every axis (`one_per_axis_permutation`; all of them with KERAS_LWP_FULL_GRID=1), is checked: output, input gradients, weight gradients (and BatchNormalization's updated
moving statistics) equal a plain single-device copy of the layer with the same weights within 1e-5
relative. Each device's block is compared with the reference's block, so replicas that disagree
fail too.

How, cheaply (tracing is most of the cost: about 570 configurations): per layer case, one
functional model holds one copy of the layer per configuration (same inputs, same weights), one
`parallelize` pins each copy to its configuration, and tf.functions of a few copies each run the
wrapped copies (the code path `fit` runs) under a GradientTape, each fed its inputs laid out as its
configuration wants them (as the layer before it hands them over in `fit`). Only if such a function
fails does each of its configurations get a function of its own, so the failure names its
configuration.

Layers that draw random numbers (Dropout, GaussianNoise, ...) run in training with a fixed seed, so every
copy draws the same numbers: each configuration must apply the single-device mask and noise.
"""

import dataclasses
import functools
import importlib
import importlib.util
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp import MeshSpec, Strategy
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, base, configurations, registered_rule, runnable_dims
from keras_lwp.placement import to_mesh
from tests.conftest import require_devices
from tests.test_hidden_conv import CONV_CLASSES

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

MESH = {"x": 2, "y": 2, "z": 2}
# Every configuration, not one per permutation of the (equal) mesh axes: KERAS_LWP_FULL_GRID=1 (~5x longer).
FULL_GRID = os.environ.get("KERAS_LWP_FULL_GRID") == "1"
SPEC = MeshSpec(tuple(MESH.items()))
N, S, C = 8, 8, 8  # batch, spatial extent, channels: each divides by any mesh axis
GROUP = 4  # configurations per tf.function: larger ones compiled slower per configuration (BatchNormalization)
L = keras.layers
P = functools.partial


@dataclasses.dataclass(frozen=True)
class Case:
    """A representative layer: `make()` builds it; `shapes` are its inputs' shapes (batch first).

    `call`: "one" layer(x), "list" layer([x0, x1, ...]) (merge layers), "args" layer(x0, x1, ...)
    (attention: query, value, key). `kwargs` go to every call (training). `vocabulary`: the inputs are
    integer ids below it (no input gradient). `state`: non-trainable weights the call updates.
    `input_gradients=False`: the output does not depend on the inputs' values (PositionEmbedding).
    """

    make: object
    shapes: tuple
    call: str = "one"
    kwargs: tuple = ()
    vocabulary: int = 0
    state: tuple = ()
    input_gradients: bool = True


TRAINING = (("training", True),)
SEED = 3  # random layers: one seed for every copy, see the module docstring
IMAGE, SEQUENCE, FLAT = (N, S, S, C), (N, S, C), (N, C)
VOLUME = (N, 4, 4, 4, 4)  # 3-D layers: smaller, every dimension still divided by any mesh axis

class TransformerBlock(keras.layers.Layer):
    """A layer made of layers with no rule of its own (keras_lwp.layers.composite): attention and a
    feed-forward with residuals and norms, named as keras_hub names them."""

    def __init__(self, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.attention = L.MultiHeadAttention(2, 4, name="self_attention")
        self.norm = L.LayerNormalization(name="norm")
        self.intermediate = L.Dense(2 * C, activation="relu", name="feedforward_intermediate_dense")
        self.output_dense = L.Dense(C, name="feedforward_output_dense")

    def call(self, x):
        x = self.norm(x + self.attention(x, x))
        return x + self.output_dense(self.intermediate(x))


def _applications_layer(module, name):
    """A layer class keras.applications defines for its models (not exported by keras.layers)."""
    return getattr(importlib.import_module(f"keras.src.applications.{module}"), name)


CASES = {
    "Dense-2d": Case(P(L.Dense, C), (FLAT,)),
    "Dense-3d": Case(P(L.Dense, C), (SEQUENCE,)),
    "Dense-4d": Case(P(L.Dense, C), (IMAGE,)),  # ConvNeXt's pointwise convolutions
    # Grouped convolutions (ConvNeXt's depthwise ones: groups = channels) run through hidden_conv.
    "Conv2D-groups": Case(P(L.Conv2D, C, 3, padding="same", groups=C), (IMAGE,)),
    # One filter per group of two channels: the product summed over taps and channels (hidden_conv).
    "Conv2D-groups-pairs": Case(P(L.Conv2D, C // 2, 3, strides=2, padding="same", groups=C // 2), (IMAGE,)),
    "Conv2D-groups2": Case(P(L.Conv2D, 2 * C, 3, strides=2, padding="same", groups=2), (IMAGE,)),
    "Conv1D-groups": Case(P(L.Conv1D, C, 3, padding="causal", groups=4), (SEQUENCE,)),
    "EinsumDense": Case(P(L.EinsumDense, "abc,cd->abd", output_shape=(S, C), bias_axes="d"), (SEQUENCE,)),
    "MaxPooling1D": Case(P(L.MaxPooling1D, 2), (SEQUENCE,)),
    "MaxPooling2D": Case(P(L.MaxPooling2D, 3, strides=2, padding="same"), (IMAGE,)),
    "AveragePooling1D": Case(P(L.AveragePooling1D, 2), (SEQUENCE,)),
    "AveragePooling2D": Case(P(L.AveragePooling2D, 2), (IMAGE,)),
    "GlobalAveragePooling1D": Case(P(L.GlobalAveragePooling1D), (SEQUENCE,)),
    "GlobalAveragePooling2D": Case(P(L.GlobalAveragePooling2D), (IMAGE,)),
    "GlobalMaxPooling1D": Case(P(L.GlobalMaxPooling1D), (SEQUENCE,)),
    "GlobalMaxPooling2D": Case(P(L.GlobalMaxPooling2D), (IMAGE,)),
    "BatchNormalization": Case(P(L.BatchNormalization), (IMAGE,), kwargs=TRAINING,
                               state=("moving_mean", "moving_variance")),
    "LayerNormalization": Case(P(L.LayerNormalization), (SEQUENCE,)),
    "Embedding": Case(P(L.Embedding, 16, C), ((N, S),), vocabulary=16),
    "MultiHeadAttention": Case(P(L.MultiHeadAttention, 2, 4), (SEQUENCE,) * 3, call="args"),
    "Dropout": Case(P(L.Dropout, 0.5, seed=SEED), (SEQUENCE,), kwargs=TRAINING),
    "GaussianNoise": Case(P(L.GaussianNoise, 0.1, seed=SEED), (FLAT,), kwargs=TRAINING),
    "GaussianDropout": Case(P(L.GaussianDropout, 0.1, seed=SEED), (FLAT,), kwargs=TRAINING),
    "AlphaDropout": Case(P(L.AlphaDropout, 0.1, seed=SEED), (FLAT,), kwargs=TRAINING),
    "SpatialDropout1D": Case(P(L.SpatialDropout1D, 0.1, seed=SEED), (SEQUENCE,), kwargs=TRAINING),
    "SpatialDropout2D": Case(P(L.SpatialDropout2D, 0.1, seed=SEED), (IMAGE,), kwargs=TRAINING),
    "Activation": Case(P(L.Activation, "tanh"), (IMAGE,)),
    "ReLU": Case(P(L.ReLU), (SEQUENCE,)),
    "LeakyReLU": Case(P(L.LeakyReLU, 0.2), (FLAT,)),
    "PReLU": Case(P(L.PReLU), (SEQUENCE,)),
    "ELU": Case(P(L.ELU), (FLAT,)),
    "Rescaling": Case(P(L.Rescaling, 0.5, offset=1.0), (FLAT,)),
    "Identity": Case(P(L.Identity), (FLAT,)),
    "ActivityRegularization": Case(P(L.ActivityRegularization, l2=0.1), (FLAT,)),
    "Softmax": Case(P(L.Softmax), (SEQUENCE,)),
    "Add": Case(P(L.Add), (IMAGE,) * 2, call="list"),
    "Subtract": Case(P(L.Subtract), (FLAT,) * 2, call="list"),
    "Multiply": Case(P(L.Multiply), (SEQUENCE,) * 2, call="list"),
    "Average": Case(P(L.Average), (FLAT,) * 3, call="list"),
    "Maximum": Case(P(L.Maximum), (FLAT,) * 2, call="list"),
    "Minimum": Case(P(L.Minimum), (FLAT,) * 2, call="list"),
    "Concatenate": Case(P(L.Concatenate), (IMAGE,) * 2, call="list"),
    "Concatenate-axis1": Case(P(L.Concatenate, axis=1), (SEQUENCE,) * 2, call="list"),
    "Flatten": Case(P(L.Flatten), (IMAGE,)),
    "Reshape": Case(P(L.Reshape, (S * S // 2, 2 * C)), (IMAGE,)),
    "Permute": Case(P(L.Permute, (2, 1)), (SEQUENCE,)),
    "RepeatVector": Case(P(L.RepeatVector, 2), (FLAT,)),
    "ZeroPadding1D": Case(P(L.ZeroPadding1D, 1), (SEQUENCE,)),
    "ZeroPadding2D": Case(P(L.ZeroPadding2D, 1), (IMAGE,)),
    "Cropping1D": Case(P(L.Cropping1D, 1), (SEQUENCE,)),
    "Cropping2D": Case(P(L.Cropping2D, 1), (IMAGE,)),
    "UpSampling1D": Case(P(L.UpSampling1D, 2), (SEQUENCE,)),
    "UpSampling2D": Case(P(L.UpSampling2D, 2), (IMAGE,)),
    "DepthwiseConv1D": Case(P(L.DepthwiseConv1D, 3, padding="same"), (SEQUENCE,)),
    "DepthwiseConv2D": Case(P(L.DepthwiseConv2D, 3, padding="same"), (IMAGE,)),
    "SeparableConv1D": Case(P(L.SeparableConv1D, C, 3, padding="same"), (SEQUENCE,)),
    "SeparableConv2D": Case(P(L.SeparableConv2D, C, 3, padding="same"), (IMAGE,)),
    "Conv1DTranspose": Case(P(L.Conv1DTranspose, C, 3, strides=2, padding="same"), (SEQUENCE,)),
    "Conv2DTranspose": Case(P(L.Conv2DTranspose, C, 3, strides=2, padding="same"), (IMAGE,)),
    # Layers split by samples only (PerSampleRule), and the 3-D kin of the 1-D/2-D ones.
    "GroupNormalization": Case(P(L.GroupNormalization, groups=2), (IMAGE,)),
    "UnitNormalization": Case(P(L.UnitNormalization), (SEQUENCE,)),
    "Masking": Case(P(L.Masking, 0.0), (SEQUENCE,)),
    "Attention": Case(P(L.Attention, use_scale=True), (SEQUENCE,) * 2, call="list"),
    "AdditiveAttention": Case(P(L.AdditiveAttention), (SEQUENCE,) * 3, call="list"),
    "Dot": Case(P(L.Dot, axes=-1), (SEQUENCE,) * 2, call="list"),
    "Conv3D": Case(P(L.Conv3D, 4, 3, padding="same"), (VOLUME,)),
    "Conv3DTranspose": Case(P(L.Conv3DTranspose, 2, 3, strides=2, padding="same"), (VOLUME,)),
    "MaxPooling3D": Case(P(L.MaxPooling3D, 2), (VOLUME,)),
    "AveragePooling3D": Case(P(L.AveragePooling3D, 2), (VOLUME,)),
    "GlobalAveragePooling3D": Case(P(L.GlobalAveragePooling3D), (VOLUME,)),
    "GlobalMaxPooling3D": Case(P(L.GlobalMaxPooling3D), (VOLUME,)),
    "ZeroPadding3D": Case(P(L.ZeroPadding3D, 1), (VOLUME,)),
    "Cropping3D": Case(P(L.Cropping3D, 1), (VOLUME,)),
    "UpSampling3D": Case(P(L.UpSampling3D, 2), (VOLUME,)),
    "SpatialDropout3D": Case(P(L.SpatialDropout3D, 0.1, seed=SEED), (VOLUME,), kwargs=TRAINING),
    "Resizing": Case(P(L.Resizing, 5, 5), (IMAGE,)),
    "CenterCrop": Case(P(L.CenterCrop, 4, 6), (IMAGE,)),
    "AdaptiveAveragePooling1D": Case(P(L.AdaptiveAveragePooling1D, 4), (SEQUENCE,)),
    "AdaptiveAveragePooling2D": Case(P(L.AdaptiveAveragePooling2D, (2, 2)), (IMAGE,)),
    "AdaptiveAveragePooling3D": Case(P(L.AdaptiveAveragePooling3D, 2), (VOLUME,)),
    "AdaptiveMaxPooling1D": Case(P(L.AdaptiveMaxPooling1D, 4), (SEQUENCE,)),
    "AdaptiveMaxPooling2D": Case(P(L.AdaptiveMaxPooling2D, (2, 2)), (IMAGE,)),
    "AdaptiveMaxPooling3D": Case(P(L.AdaptiveMaxPooling3D, 2), (VOLUME,)),
    # keras.applications' own pointwise layers (EfficientNet, ConvNeXt, InceptionResNetV2).
    "Normalization": Case(P(L.Normalization, mean=0.5, variance=2.0), (IMAGE,)),
    "LayerScale": Case(lambda name=None: _applications_layer("convnext", "LayerScale")(0.5, C, name=name), (IMAGE,)),
    "CustomScaleLayer": Case(lambda name=None: _applications_layer("inception_resnet_v2", "CustomScaleLayer")(
        0.17, name=name), (IMAGE,) * 2, call="list"),
    # A layer made of layers: sample and (Megatron-style) heads splits, run by its own call.
    "composite": Case(TransformerBlock, (SEQUENCE,)),
    # Recurrences run unrolled over their (known) time steps: few steps keep the traces short.
    "SimpleRNN": Case(P(L.SimpleRNN, 4, return_sequences=True), ((N, 3, C),)),
    "LSTM": Case(P(L.LSTM, 4), ((N, 3, C),)),
    "GRU": Case(P(L.GRU, 4, return_sequences=True), ((N, 3, C),)),
    "RNN": Case(lambda name=None: L.RNN(L.LSTMCell(4), name=name), ((N, 3, C),)),
    "Bidirectional": Case(lambda name=None: L.Bidirectional(L.GRU(4, return_sequences=True), name=name),
                          ((N, 3, C),)),
    "ConvLSTM1D": Case(P(L.ConvLSTM1D, 2, 3, padding="same"), ((N, 2, 4, 2),)),
    "ConvLSTM2D": Case(P(L.ConvLSTM2D, 2, 3, padding="same", return_sequences=True), ((N, 2, 4, 4, 2),)),
    "ConvLSTM3D": Case(P(L.ConvLSTM3D, 2, 3, padding="same"), ((N, 2, 2, 4, 4, 2),)),
    # Transformers' leaf layers (keras_lwp.layers.hub): the token embedding forward and in reverse (an
    # LM head tied to it), RMS normalization.
    "ReversibleEmbedding": Case(P(L.ReversibleEmbedding, 20, C), ((N, S),), vocabulary=20),
    "ReversibleEmbedding-reverse": Case(P(L.ReversibleEmbedding, 20, C), (SEQUENCE,),
                                        kwargs=(("reverse", True),)),
    "RMSNormalization": Case(P(L.RMSNormalization), (SEQUENCE,)),
}
HUB_LAYERS = {  # keras_hub's own (keras_hub is in the test extra)
    "PositionEmbedding": ("keras_hub.layers", dict(sequence_length=S)),
    "LlamaLayerNorm": ("keras_hub.src.models.llama.llama_layernorm", {}),
    "MistralLayerNormalization": ("keras_hub.src.models.mistral.mistral_layer_norm", {}),
    "QwenLayerNorm": ("keras_hub.src.models.qwen.qwen_layernorm", {}),
    "Phi3LayerNorm": ("keras_hub.src.models.phi3.phi3_layernorm", {}),
    "T5LayerNorm": ("keras_hub.src.models.t5.t5_layer_norm", {}),
    # Gemma's x * (1 + scale), under the class name of Keras' RMSNormalization
    "RMSNormalization-gemma": ("keras_hub.src.models.gemma.rms_normalization", {}),
}
if importlib.util.find_spec("keras_hub") is not None:
    for _name, (_module, _kwargs) in HUB_LAYERS.items():
        _cls = getattr(importlib.import_module(_module), _name.split("-")[0])
        CASES[_name] = Case(lambda name=None, cls=_cls, kwargs=_kwargs: cls(name=name, **kwargs), (SEQUENCE,),
                            input_gradients=_name != "PositionEmbedding")
# InputLayer computes nothing: its configuration is how a batch is packed (test_input_layer_packs_...).
COVERED_ELSEWHERE = {**{name: "tests/test_hidden_conv.py" for name in CONV_CLASSES},
                     "InputLayer": "test_input_layer_packs_batches",
                     **{name.split("-")[0]: "here, when keras_hub is installed"
                        for name in HUB_LAYERS if name not in CASES}}


# -- building the copies -------------------------------------------------------------------------

def _inputs(case):
    return [keras.Input(shape[1:], name=f"in{i}", dtype="int32" if case.vocabulary else "float32")
            for i, shape in enumerate(case.shapes)]


def _call(case, layer, inputs, **kwargs):
    kwargs = {**dict(case.kwargs), **kwargs}
    if case.call == "list":
        return layer(list(inputs), **kwargs)
    if case.call == "args":
        return layer(*inputs, **kwargs)
    return layer(inputs[0], **kwargs)


def _single(case_id):
    """A one-layer model of the case, its layer named 'layer'."""
    case = CASES[case_id]
    inputs = _inputs(case)
    layer = case.make(name="layer")
    return keras.Model(inputs, _call(case, layer, inputs)), layer


@functools.lru_cache(maxsize=None)
def case_info(case_id):
    model, _ = _single(case_id)
    return layer_graph(model, N).nodes["layer"]["info"]


@functools.lru_cache(maxsize=None)
def case_configs(case_id):
    info = case_info(case_id)
    every = configurations(info, runnable_dims(registered_rule(info).dimensions(info)), SPEC)
    return every if FULL_GRID else one_per_axis_permutation(every)


def one_per_axis_permutation(configs):
    """One configuration per set of split dimensions (and axes per dimension), and every (dimension,
    mesh axis) pair the full grid splits.

    The mesh's axes all have size 2, so a configuration and its image under a permutation of the axes
    (n=x,c=y and n=y,c=z) run the same program on relabelled devices. Each class's representative is
    the member that splits the most (dimension, axis) pairs not yet chosen; a pair still missing
    afterwards brings in the first configuration that has it.
    """
    classes = {}
    for config in configs:
        shape = tuple(sorted((dim, len(axes)) for dim, axes in _axes_of(config).items()))
        classes.setdefault(shape, []).append(config)
    chosen, covered = [], set()
    for members in classes.values():
        best = max(members, key=lambda c: len(_pairs(c) - covered))  # the first of equals
        chosen.append(best)
        covered |= _pairs(best)
    for config in configs:
        if not _pairs(config) <= covered:
            chosen.append(config)
            covered |= _pairs(config)
    return tuple(chosen)


def _pairs(config):
    return set(config.items())


def _axes_of(config):
    axes = {}
    for dim, axis in config.items():
        axes.setdefault(dim, []).append(axis)
    return axes


def config_id(config):
    return ",".join(item.strip() for item in str(config).strip("{}").split(",")) or "replicated"


def _random_weights(layer, rng):
    values = []
    for weight in layer.weights:
        shape = tuple(weight.shape)
        if "variance" in weight.path:
            values.append(rng.uniform(0.5, 2.0, shape).astype("float32"))
        else:
            values.append(rng.standard_normal(shape, dtype="float32"))
    layer.set_weights(values)


def _data(case, rng):
    if case.vocabulary:
        return [rng.integers(0, case.vocabulary, shape).astype("int32") for shape in case.shapes]
    return [rng.standard_normal(shape, dtype="float32") for shape in case.shapes]


def _watched(case, tensors):
    return [] if case.vocabulary or not case.input_gradients else list(tensors)


def _reference(case_id, weights, data, cotangent):
    """The plain layer on one device: output, input gradients, weight gradients, updated state."""
    case = CASES[case_id]
    _, layer = _single(case_id)
    layer.set_weights(weights)
    xs = [tf.constant(x) for x in data]
    with tf.GradientTape() as tape:
        for x in _watched(case, xs):
            tape.watch(x)
        y = _call(case, layer, xs)
    grads = tape.gradient(y, _watched(case, xs) + list(layer.trainable_weights), output_gradients=cotangent)
    state = [getattr(layer, name).numpy() for name in case.state]
    return [np.asarray(tf.convert_to_tensor(t)) for t in [y, *grads]] + state  # Embedding: IndexedSlices


def _run(case, layer, xs, cotangent):
    """Inside a tf.function: the wrapped layer's output, input and weight gradients, updated state."""
    with tf.GradientTape() as tape:
        for x in _watched(case, xs):
            tape.watch(x)
        y = _call(case, layer, xs)
    grads = tape.gradient(y, _watched(case, xs) + list(layer.trainable_weights), output_gradients=cotangent)
    grads = [tf.convert_to_tensor(g) for g in grads]  # Embedding: IndexedSlices
    return [y, *grads] + [getattr(layer, name).value for name in case.state]


def _sharded(case_id, configs, weights, data, cotangent, mesh):
    """Per configuration, the same quantities from a wrapped copy running on the mesh (per-device
    blocks, see `_blocks`), or the exception its function raised."""
    case = CASES[case_id]
    inputs = _inputs(case)
    layers = [case.make(name=f"layer{index}") for index in range(len(configs))]
    model = keras.Model(inputs, [_call(case, layer, inputs) for layer in layers])
    for layer in layers:
        layer.set_weights(weights)
    strategy = Strategy({layer.name: config for layer, config in zip(layers, configs)}, SPEC)
    keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=N)

    info = case_info(case_id)
    dims = runnable_dims(registered_rule(info).dimensions(info))
    feeds = []
    for config in configs:
        place = Placement(info, dims, config, SPEC)
        xs = [to_mesh(x, place.input_layout(i, t), mesh) for i, (x, t) in enumerate(zip(data, info.inputs))]
        feeds.append((xs, to_mesh(cotangent, place.output_layout(info.output), mesh)))

    def run_group(group, group_feeds):
        return [_run(case, layer, xs, cs) for layer, (xs, cs) in zip(group, group_feeds)]

    found = []
    for start in range(0, len(layers), GROUP):
        group, group_feeds = layers[start:start + GROUP], feeds[start:start + GROUP]
        try:
            outs = tf.function(functools.partial(run_group, group), autograph=False)(group_feeds)
            found += [[_blocks(t) for t in out] for out in outs]
        except Exception:  # one function per configuration, to name the one that fails
            for layer, (xs, cs) in zip(group, group_feeds):
                layer.set_weights(weights)  # BatchNormalization's statistics may have moved
                try:
                    found.append([_blocks(t) for t in tf.function(functools.partial(_run, case, layer),
                                                                   autograph=False)(xs, cs)])
                except Exception as error:  # noqa: BLE001 (reported by the configuration's test)
                    found.append(error)
    return found


def _blocks(tensor):
    """[(index into the global tensor, that device's block)] for every device of the mesh."""
    layout = dtensor.fetch_layout(tensor)
    mesh = layout.mesh
    names = mesh.dim_names
    sizes = [mesh.dim_size(name) for name in names]
    blocks = []
    for device, part in enumerate(dtensor.unpack(tensor)):
        coords = np.unravel_index(device, sizes)
        part = part.numpy()
        index = []
        for axis, spec in enumerate(layout.sharding_specs):
            if spec == dtensor.UNSHARDED:
                index.append(slice(None))
            else:
                width = part.shape[axis]
                start = coords[names.index(spec)] * width
                index.append(slice(start, start + width))
        blocks.append((tuple(index), part))
    return layout.sharding_specs, blocks


@functools.lru_cache(maxsize=None)
def results(case_id):
    """(single-device reference, {config: sharded results or the exception}) of a case."""
    require_devices(8)
    case = CASES[case_id]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    _, layer = _single(case_id)
    _random_weights(layer, rng)
    weights = layer.get_weights()
    data = _data(case, rng)
    cotangent = rng.standard_normal(case_info(case_id).output.shape, dtype="float32")
    want = _reference(case_id, weights, data, tf.constant(cotangent))
    configs = case_configs(case_id)
    got = _sharded(case_id, configs, weights, data, cotangent, keras_lwp.make_mesh(MESH))
    return want, dict(zip(configs, got))


# -- the tests -----------------------------------------------------------------------------------

GRID = [(case_id, config) for case_id in CASES for config in case_configs(case_id)]


@functools.lru_cache(maxsize=None)
def _names(case_id):
    case = CASES[case_id]
    _, layer = _single(case_id)
    inputs = [f"input {i} gradient" for i in range(len(case.shapes))] if _watched(case, case.shapes) else []
    return ["output", *inputs, *(f"{w.path.split('/', 1)[-1]} gradient" for w in layer.trainable_weights),
            *(f"updated {name}" for name in case.state)]


@pytest.mark.parametrize("case_id,config", GRID, ids=[f"{c}-{config_id(k)}" for c, k in GRID])
def test_configuration_matches_single_device(case_id, config):
    want, got = results(case_id)
    got = got[config]
    if isinstance(got, Exception):
        raise AssertionError(f"{case_id} under {config} does not run: {str(got).strip().splitlines()[0]}") from got
    names = _names(case_id)
    assert len(got) == len(want) == len(names)
    # A weight gradient whose exact value is zero (attention's key bias: softmax ignores a shift)
    # holds float noise only: its floor is 1e-5 of the layer's largest weight gradient.
    weight_grads = [w for name, w in zip(names, want) if name.endswith(" gradient") and not name.startswith("input")]
    gradient_scale = max([float(np.max(np.abs(w))) for w in weight_grads if w.size] or [0.0])
    for name, (_, blocks), reference in zip(names, got, want):
        scale = float(np.max(np.abs(reference))) if reference.size else 0.0
        if any(reference is w for w in weight_grads):
            scale = max(scale, gradient_scale)
        for device, (index, block) in enumerate(blocks):
            assert block.shape == reference[index].shape, f"{case_id} {config} {name} on device {device}: shape"
            np.testing.assert_allclose(block, reference[index], rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{case_id} {config}: {name} on device {device}")
    # The output is laid out as the configuration says.
    info = case_info(case_id)
    place = Placement(info, runnable_dims(registered_rule(info).dimensions(info)), config, SPEC)
    assert list(got[0][0]) == [a or dtensor.UNSHARDED for a in place.output_layout(info.output)]


def test_every_registered_rule_has_numerics():
    """A rule with no representative here (or in test_hidden_conv) fails the suite."""
    covered = {type(case.make()).__name__ for case in CASES.values()} | set(COVERED_ELSEWHERE)
    missing = sorted(set(base._RULES) - covered)
    assert not missing, f"registered rules with no per-layer numerics test: {missing}; add a Case to CASES"


@pytest.mark.skipif(FULL_GRID, reason="the full grid is running")
@pytest.mark.parametrize("case_id", sorted(CASES))
def test_the_reduced_grid_splits_every_dimension_along_every_axis(case_id):
    info = case_info(case_id)
    every = configurations(info, runnable_dims(registered_rule(info).dimensions(info)), SPEC)
    assert set().union(*map(_pairs, every)) == set().union(*map(_pairs, case_configs(case_id)))


def test_most_cases_really_split():
    """The grid is not hollow: a rule whose runnable space collapsed to replicated shows up here."""
    whole = sorted(case_id for case_id in CASES if len(case_configs(case_id)) == 1)
    assert whole == sorted(["SeparableConv1D", "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose"])


def _image_model():
    inputs = keras.Input(IMAGE[1:], name="image")
    return keras.Model(inputs, L.Identity(name="layer")(inputs))


@functools.lru_cache(maxsize=None)
def input_configs():
    info = layer_graph(_image_model(), N).nodes["image"]["info"]
    return tuple(configurations(info, runnable_dims(registered_rule(info).dimensions(info)), SPEC))


@pytest.mark.parametrize("config", input_configs(), ids=[f"InputLayer-{config_id(c)}" for c in input_configs()])
def test_input_layer_packs_batches(config):
    """InputLayer computes nothing; its configuration is the layout `fit` packs a batch with: every
    device must get its block of the batch."""
    require_devices(8)
    from keras_lwp.fit_loop import batch_to_mesh

    model = _image_model()
    keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=Strategy({"image": config}, SPEC),
                          batch_size=N)
    x = np.random.default_rng(0).standard_normal(IMAGE, dtype="float32")
    packed, _, _ = keras.utils.unpack_x_y_sample_weight(batch_to_mesh(model, (x,)))
    specs, blocks = _blocks(packed)
    assert list(specs) == [config.get(d, dtensor.UNSHARDED) for d in ("sample", "height", "width", "channel")]
    for index, block in blocks:
        np.testing.assert_array_equal(block, x[index])
