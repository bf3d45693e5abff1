"""keras_hub transformers (optional extra, installed by the test command) train like one device.

A BERT classifier built from a configuration with random weights (2 layers, hidden 64, no download):
its inputs leave the sequence length open (`input_shapes` fixes it for the plan), its functional graph
holds keras.ops (a GetItem, run replicated with a warning) and composite layers (TransformerEncoder,
split by samples and by attention heads through keras_lwp.layers.composite). Compared in float64 after
one epoch: losses and every weight.
"""

import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub", reason="keras_hub is not installed: pip install -e '.[hub]'")

import keras  # noqa: E402

import keras_lwp  # noqa: E402
from keras_lwp.graph import layer_graph  # noqa: E402
from keras_lwp.placement import to_host  # noqa: E402
from keras_lwp.planner import random_strategy  # noqa: E402
from tests import precision  # noqa: E402

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

MESH = {"x": 4, "y": 2}
BATCH, LENGTH, VOCABULARY = 8, 16, 50
SHAPES = {"token_ids": (LENGTH,), "segment_ids": (LENGTH,), "padding_mask": (LENGTH,)}


def bert_classifier(hidden=64):
    keras.utils.set_random_seed(1)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=hidden,
                                             intermediate_dim=2 * hidden, max_sequence_length=LENGTH)
    head = keras.layers.Dense(3, name="classifier")(backbone.output["pooled_output"])
    return keras.Model(backbone.input, head)


def data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, LENGTH, (2 * BATCH, 1))
    x = {"token_ids": rng.integers(0, VOCABULARY, (2 * BATCH, LENGTH)).astype("int32"),
         "segment_ids": rng.integers(0, 2, (2 * BATCH, LENGTH)).astype("int32"),
         "padding_mask": (np.arange(LENGTH)[None, :] < lengths).astype("int32")}
    return x, rng.integers(0, 3, 2 * BATCH)


# At hidden 64 "auto" keeps this model's blocks whole (moving anything costs more than it saves); at
# hidden 256 the weights' gradient all-reduce outweighs the activations' partial sums and "auto" runs
# the blocks Megatron-style, by heads. The test trains that plan on the small model (same graph).
WIDE = 256


def auto_plan_of_wide():
    """(plan, its model's graph order) of "auto" on the float32 model at hidden WIDE."""
    model = bert_classifier(WIDE)
    return keras_lwp.search(model, MESH, BATCH, input_shapes=SHAPES), list(layer_graph(model, BATCH, SHAPES))


def train(strategy=None):
    wide_plan = auto_plan_of_wide() if strategy == "auto" else None
    with precision.float64():
        model = bert_classifier()
        if wide_plan is not None:  # the same plan, named for this model (keras.ops get new names per model)
            plan, order = wide_plan
            names = dict(zip(order, layer_graph(model, BATCH, SHAPES)))
            strategy = keras_lwp.Strategy({names[name]: plan[name] for name in plan}, plan.mesh, name="auto")
        if strategy == "random":
            strategy = random_strategy(model, MESH, BATCH, seed=2, input_shapes=SHAPES)
        if strategy is not None:
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=strategy, batch_size=BATCH,
                                  input_shapes=SHAPES)
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = data()
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        weights = [np.asarray(to_host(v.value)) for v in model.weights]
        return history.history["loss"], weights, model


@pytest.fixture(scope="module")
def one_device():
    return train()


# auto's plan of the wide model (it runs both blocks by heads on y); a random plan (seed 2 splits the
# second block by heads on y, the first by samples, the token embedding by samples, the position
# embedding by samples and channels, and the rest by samples, sequence and channels).
@pytest.mark.parametrize("strategy", ["auto", "random"])
@pytest.mark.filterwarnings("ignore::keras_lwp.layers.UnknownLayerWarning")
def test_bert_trains_like_one_device(one_device, strategy):
    losses, weights, _ = one_device
    got_losses, got_weights, _ = train(strategy)
    np.testing.assert_allclose(got_losses, losses, rtol=1e-9)
    scale = max(float(np.max(np.abs(w))) for w in weights)
    for reference, got in zip(weights, got_weights):
        np.testing.assert_allclose(got, reference, rtol=1e-9, atol=1e-9 * scale)


def test_an_open_sequence_length_needs_input_shapes():
    model = bert_classifier()
    with pytest.raises(ValueError, match="input_shapes="):
        keras_lwp.search(model, MESH, BATCH)
    assert getattr(model, "_keras_lwp", None) is None


@pytest.mark.filterwarnings("ignore::keras_lwp.layers.UnknownLayerWarning")
def test_the_plans_split_the_blocks_by_heads():
    """The plans above are not hollow: each runs a transformer block by attention heads."""
    random = random_strategy(bert_classifier(), MESH, BATCH, seed=2, input_shapes=SHAPES)
    assert "heads" in dict(random["transformer_layer_1"]) and "channel" in dict(random["position_embedding"])
    auto, _ = auto_plan_of_wide()
    blocks = [name for name in auto if name.startswith("transformer_layer")]
    assert len(blocks) == 2 and all("heads" in dict(auto[name]) for name in blocks)


def test_a_composite_layer_may_read_token_ids():
    """TokenAndPositionEmbedding (made of layers) looks the integer ids up itself: planned, not refused."""
    def run(parallel):
        with precision.float64():
            keras.utils.set_random_seed(2)
            ids = keras.Input((LENGTH,), dtype="int32", name="ids")
            x = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, LENGTH, 8, name="embedding")(ids)
            model = keras.Model(ids, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling1D()(x)))
            if parallel:
                keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy="data", batch_size=BATCH)
            model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            x, y = data()
            model.fit(x["token_ids"], y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            return [np.asarray(to_host(v.value)) for v in model.weights]

    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_a_position_embedding_read_from_an_offset_runs_whole():
    """Rows chosen by a start index (a cache's offset) run whole; from the start they split."""
    inputs = keras.Input((LENGTH, 8), name="hidden")
    shifted = keras_hub.layers.PositionEmbedding(2 * LENGTH, name="shifted")(inputs, start_index=3)
    plain = keras_hub.layers.PositionEmbedding(LENGTH, name="plain")(inputs)
    model = keras.Model(inputs, keras.layers.Add(name="add")([inputs, shifted, plain]))
    plan = keras_lwp.search(model, MESH, BATCH, strategy="data")
    assert plan["shifted"] == keras_lwp.Config({}) and "sample" in dict(plan["plain"])


def gemma_lm():
    """Gemma: RMS norms, grouped-query attention, a gated feed-forward, a tied reversible embedding."""
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=4,
                                              num_key_value_heads=2, hidden_dim=32, intermediate_dim=64, head_dim=8)
    return keras.Model(backbone.input, keras.layers.Dense(VOCABULARY, name="lm_head")(backbone.output))


def deberta_lm():
    """DeBERTa-v3: disentangled attention over relative-position buckets, a relative embedding."""
    backbone = keras_hub.models.DebertaV3Backbone(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=32,
                                                  intermediate_dim=64, max_sequence_length=LENGTH, bucket_size=8)
    return keras.Model(backbone.input, keras.layers.Dense(VOCABULARY, name="lm_head")(backbone.output))


def _fit_adam(model, x, y):
    """(per-step losses, weights) after one epoch of Adam."""
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0).history["loss"]
    return losses, [np.asarray(to_host(v.value)) for v in model.weights]


def _assert_same_training(reference, run):
    """Losses and every weight of `run` as `reference`'s (one device), within 1e-9 (float64)."""
    np.testing.assert_allclose(run[0], reference[0], rtol=1e-9)
    scale = max(float(np.max(np.abs(w))) for w in reference[1])
    for want, got in zip(reference[1], run[1]):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * scale)


# Random plans (seed 1) that run a block by attention heads: Gemma's second decoder block on x,
# both of DeBERTa's encoder layers by samples on x and heads on y.
OTHER_BACKBONES = {"gemma": (gemma_lm, 1, "decoder_block_1"),
                   "deberta_v3": (deberta_lm, 1, "disentangled_attention_encoder_layer_0")}


@pytest.mark.parametrize("name", sorted(OTHER_BACKBONES))
def test_other_backbones_train_like_one_device_under_a_random_plan(name):
    """Architectures beyond BERT's, as a user brings them: a language-model head over the sequence."""
    build, seed, block = OTHER_BACKBONES[name]
    x, _ = data()
    x = {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"]}
    y = np.roll(x["token_ids"], -1, axis=1)
    shapes = {key: (LENGTH,) for key in x}

    def run(parallel):
        with precision.float64(), precision.float64_throughout():
            keras.utils.set_random_seed(1)
            model = build()
            if parallel:
                plan = random_strategy(model, MESH, BATCH, seed=seed, input_shapes=shapes)
                assert "heads" in dict(plan[block]), "the plan does not split a block by heads"
                keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=plan, batch_size=BATCH,
                                      input_shapes=shapes)
            return _fit_adam(model, x, y)

    _assert_same_training(run(False), run(True))


def test_a_recurrence_over_tensor_lists_is_refused_before_any_change():
    """RWKV-7's blocks run their recurrence as a loop writing a TensorArray (TensorList ops), which
    DTensor cannot run: parallelize names the block and the op, and leaves the model as it was."""
    backbone = keras_hub.models.RWKV7Backbone(hidden_size=32, head_size=16, num_layers=1, vocabulary_size=VOCABULARY,
                                              intermediate_dim=64, gate_lora=8, mv_lora=8, aaa_lora=8, decay_lora=8)
    model = keras.Model(backbone.input, keras.layers.Dense(VOCABULARY, name="lm_head")(backbone.output))
    calls = [type(layer.call) for layer in model.layers]
    with pytest.raises(ValueError, match=r"Layer 'rwkv_layer_0' \(RWKV7_Block\).*TensorList"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=BATCH, input_shapes={"token_ids": (LENGTH,),
                                                                                            "padding_mask": (LENGTH,)})
    assert not hasattr(model, "_keras_lwp") and calls == [type(layer.call) for layer in model.layers]


@pytest.mark.filterwarnings("ignore::keras_lwp.layers.UnknownLayerWarning")
@pytest.mark.parametrize("strategy", ["data", "random"])
def test_a_backbone_called_as_a_layer_trains_like_one_device(strategy):
    """`backbone(inputs)`: a functional model nested in the user's, whose own inputs leave the sequence
    length open even when the user's do not (it was refused: "needs static shapes"). keras_lwp reads
    it on the shapes the outer model calls it with."""
    def build():
        keras.utils.set_random_seed(1)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCABULARY, num_layers=1, num_heads=2, hidden_dim=32,
                                                 intermediate_dim=64, max_sequence_length=LENGTH)
        inputs = {key: keras.Input((None,), dtype="int32", name=key) for key in SHAPES}
        return keras.Model(inputs, keras.layers.Dense(3, name="classifier")(backbone(inputs)["pooled_output"]))

    def run(parallel):
        with precision.float64():
            model = build()
            if parallel:
                plan = (random_strategy(model, MESH, BATCH, seed=4, input_shapes=SHAPES) if strategy == "random"
                        else strategy)
                keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=plan, batch_size=BATCH,
                                      input_shapes=SHAPES)
                assert sum(1 for config in keras_lwp.strategy_of(model).values() if config) > 1
            return _fit_adam(model, *data())

    _assert_same_training(run(False), run(True))
