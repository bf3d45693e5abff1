"""keras_hub backbones, built from configurations with random weights (no download), planned by
"auto" on 4x2 and on 8 logical CPU devices, trained against one device in float64.

    python -m benchmarks.check_hub
    python -m benchmarks.check_hub --models bert,gpt2 --steps 6
    python -m benchmarks.check_hub --models mistral,gemma,f_net --strategies auto,random0 --rounds 0

For each model and mesh: the plan's splits (how many layers split, which split each transformer block
runs) and the worst weight error after `--steps` fit steps in float64 relative to the largest weight
(goal: 1e-9; the float32 casts keras_hub's Llama makes whatever the dtype run in float64 for it,
see float64_throughout); then, in float32, the median steady step (each step's loss read back, the
first step of each fit left out) of one device, "data", "owt" and "auto", in `--rounds` rounds interleaved across
them, all in this process (8 logical devices share this machine's cores: the figures compare the
strategies with each other; the one-device figure runs on one of the 8 logical devices).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from benchmarks.steady import interleaved_medians, timed_fit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["bert", "gpt2", "llama", "vit"], "keras_hub backbones (also those of OTHER_TEXT "
                  "and SEQ2SEQ).")
flags.DEFINE_list("meshes", ["4x2", "8"], "Meshes to plan on.")
flags.DEFINE_list("strategies", ["data", "owt", "auto"], "Strategies timed beside one device (also "
                  "'auto-profiled': auto with cost_model='profiled'; 'random<seed>': a random valid plan, "
                  "not one of the baselines auto is held against).")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("length", 64, "Sequence length (image side / 2 for ViT).")
flags.DEFINE_integer("steps", 3, "fit steps of the float64 comparison with one device.")
flags.DEFINE_integer("timed_steps", 6, "fit steps per timing round (float32; the first of each is left out).")
flags.DEFINE_integer("rounds", 4, "Timing rounds, interleaved across the contenders (0: no timing).")
flags.DEFINE_enum("floatx", "float64", ["float64", "float32"], "Float type of the comparison with one device: "
                  "float32 for models keras_hub itself cannot run in float64 (its MoE blocks mix in float32 "
                  "constants: Mixtral, Qwen3-MoE).")

VOCABULARY = 512
# More text backbones (class, keyword arguments at a sequence length), built and checked like GPT-2:
# a language-model head over the sequence output. Their float64 check is what they are here for.
_DECODER = dict(vocabulary_size=VOCABULARY, num_layers=2, hidden_dim=64, intermediate_dim=128)
OTHER_TEXT = {
    "mistral": ("MistralBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, **_DECODER)),
    "gemma": ("GemmaBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, head_dim=16, **_DECODER)),
    "qwen": ("QwenBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, **_DECODER)),
    "phi3": ("Phi3Backbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, **_DECODER)),
    "falcon": ("FalconBackbone", lambda n: dict(vocabulary_size=VOCABULARY, num_layers=2, num_attention_heads=4,
                                               hidden_dim=64, intermediate_dim=128)),
    "opt": ("OPTBackbone", lambda n: dict(num_heads=4, max_sequence_length=n, **_DECODER)),
    "gpt_neox": ("GPTNeoXBackbone", lambda n: dict(num_heads=4, max_sequence_length=n, **_DECODER)),
    "bloom": ("BloomBackbone", lambda n: dict(num_heads=4, **_DECODER)),
    "distil_bert": ("DistilBertBackbone", lambda n: dict(num_heads=4, max_sequence_length=n, **_DECODER)),
    "roberta": ("RobertaBackbone", lambda n: dict(num_heads=4, max_sequence_length=n, **_DECODER)),
    "electra": ("ElectraBackbone", lambda n: dict(vocab_size=VOCABULARY, num_layers=2, num_heads=4, hidden_dim=64,
                                                 embedding_dim=64, intermediate_dim=128, max_sequence_length=n)),
    "albert": ("AlbertBackbone", lambda n: dict(num_heads=4, embedding_dim=32, max_sequence_length=n, **_DECODER)),
    "deberta_v3": ("DebertaV3Backbone", lambda n: dict(num_heads=4, max_sequence_length=n, bucket_size=8, **_DECODER)),
    "f_net": ("FNetBackbone", lambda n: dict(max_sequence_length=n, **_DECODER)),
    "qwen3": ("Qwen3Backbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, head_dim=16, **_DECODER)),
    "roformer_v2": ("RoformerV2Backbone", lambda n: dict(num_heads=4, head_size=16, max_wavelength=n, **_DECODER)),
    "xlnet": ("XLNetBackbone", lambda n: dict(num_heads=4, **_DECODER)),
    "esm2": ("ESM2Backbone", lambda n: dict(num_heads=4, **_DECODER)),
    "gemma3": ("Gemma3Backbone", lambda n: dict(image_size=None, num_query_heads=4, num_key_value_heads=2, head_dim=16,
                                                use_sliding_window_attention=True, sliding_window_size=n // 4,
                                                use_post_ffw_norm=True, use_post_attention_norm=True, **_DECODER)),
    "llama3": ("Llama3Backbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, **_DECODER)),
    "qwen2": ("Qwen2Backbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, **_DECODER)),
    "gpt_oss": ("GptOssBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, num_experts=4, top_k=2,
                                                 sliding_window=n // 4, **_DECODER)),
    # keras_hub fails these two in float64 even on one device: check them with --floatx=float32
    "mixtral": ("MixtralBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, num_experts=4,
                                                  top_k=2, **_DECODER)),
    "qwen3_moe": ("Qwen3MoeBackbone", lambda n: dict(num_query_heads=4, num_key_value_heads=2, head_dim=16,
                                                     moe_intermediate_dim=32, num_experts=4, top_k=2, **_DECODER)),
    # refused by parallelize (its recurrence is a loop over TensorLists, which DTensor cannot run)
    "rwkv7": ("RWKV7Backbone", lambda n: dict(hidden_size=64, head_size=16, num_layers=2, vocabulary_size=VOCABULARY,
                                              intermediate_dim=128, gate_lora=16, mv_lora=8, aaa_lora=8,
                                              decay_lora=8)),
}

# Encoder-decoders (class, keyword arguments at a sequence length): a language-model head over the
# decoder's output, every input made up from its name and dtype (`build`). T5 runs in float32 only:
# in float64 with a static sequence length keras_hub's relative position buckets mix int32 and int64
# (a T5Backbone called on static-length inputs fails so in plain Keras too).
_SMALL = dict(vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32)
SEQ2SEQ = {
    "bart": ("BartBackbone", lambda n: dict(max_sequence_length=n, **_SMALL)),
    "whisper": ("WhisperBackbone", lambda n: dict(num_mels=8, max_encoder_sequence_length=2 * n,
                                                  max_decoder_sequence_length=n, **_SMALL)),
    "t5": ("T5Backbone", lambda n: dict(key_value_dim=8, **_SMALL)),
}


def build(name):
    """(model, input_shapes, data(rng) -> (x, y)) of a small keras_hub backbone with a head and a loss."""
    import keras
    import keras_hub
    import numpy as np

    length, batch = FLAGS.length, FLAGS.batch_size * 2
    common = dict(num_layers=2, hidden_dim=128, intermediate_dim=256)
    if name in SEQ2SEQ:
        cls, kwargs = SEQ2SEQ[name]
        backbone = getattr(keras_hub.models, cls)(**kwargs(length))
        model = keras.Model(backbone.input, keras.layers.Dense(VOCABULARY, name="lm_head")(
            backbone.output["decoder_sequence_output"]))
        shapes = {t.name: tuple(length if d is None else d for d in t.shape[1:]) for t in model.inputs}

        def data(rng):  # masks all ones, token ids, and (Whisper) audio features
            x = {key: (np.ones((batch,) + shape, int) if "mask" in key
                       else rng.integers(0, VOCABULARY, (batch,) + shape) if "token" in key
                       else rng.standard_normal((batch,) + shape)) for key, shape in shapes.items()}
            return x, rng.integers(0, VOCABULARY, (batch, length))

        return model, shapes, data
    if name == "vit":
        backbone = keras_hub.models.ViTBackbone(image_shape=(2 * length, 2 * length, 3), patch_size=16, num_heads=4,
                                                num_layers=2, hidden_dim=128, mlp_dim=256)
        pooled = keras.layers.GlobalAveragePooling1D(name="pool")(backbone.output)
        model = keras.Model(backbone.input, keras.layers.Dense(10, name="classifier")(pooled))
        return model, None, lambda rng: (rng.standard_normal((batch, 2 * length, 2 * length, 3)),
                                         rng.integers(0, 10, batch))
    if name == "bert":
        backbone = keras_hub.models.BertBackbone(vocabulary_size=VOCABULARY, num_heads=4, max_sequence_length=length,
                                                 **common)
        model = keras.Model(backbone.input, keras.layers.Dense(3, name="classifier")(backbone.output["pooled_output"]))
        shapes = {"token_ids": (length,), "segment_ids": (length,), "padding_mask": (length,)}

        def data(rng):
            x = {"token_ids": rng.integers(0, VOCABULARY, (batch, length)), "segment_ids": np.zeros((batch, length), int),
                 "padding_mask": np.ones((batch, length), int)}
            return x, rng.integers(0, 3, batch)

        return model, shapes, data
    if name == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=VOCABULARY, num_heads=4, max_sequence_length=length,
                                                 **common)
    elif name == "llama":  # rotary embeddings, grouped-query attention, gated feed-forward, RMS norms
        backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCABULARY, num_query_heads=4, num_key_value_heads=2,
                                                  **common)
    else:
        backbone = getattr(keras_hub.models, OTHER_TEXT[name][0])(**OTHER_TEXT[name][1](length))
    output = backbone.output["sequence_output"] if isinstance(backbone.output, dict) else backbone.output
    model = keras.Model(backbone.input, keras.layers.Dense(VOCABULARY, name="lm_head")(output))
    shapes = {key: (length,) for key in backbone.input}

    def data(rng):  # a causal LM: predict each next token (the encoders too: only the numbers matter here)
        tokens = rng.integers(0, VOCABULARY, (batch, length + 1))
        x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((batch, length), int),
             "segment_ids": np.zeros((batch, length), int)}
        return {key: x[key] for key in backbone.input}, tokens[:, 1:]

    return model, shapes, data


def make(name, mesh, strategy):
    """(model compiled for fit, (x, y) of 2 batches): one device when `strategy` is None."""
    import keras
    import numpy as np

    import keras_lwp

    keras.utils.set_random_seed(0)
    model, shapes, data = build(name)
    if strategy is not None:
        # "auto-profiled": auto with the cost model measured on this mesh (cached on disk)
        cost_model = "profiled" if strategy == "auto-profiled" else "analytic"
        mesh = keras_lwp.make_mesh(mesh)
        if strategy.startswith("random"):  # "random<seed>": a random valid plan
            strategy = keras_lwp.planner.random_strategy(model, mesh, FLAGS.batch_size, int(strategy[6:]),
                                                         input_shapes=shapes)
        else:
            strategy = strategy.replace("-profiled", "")
        keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=FLAGS.batch_size, input_shapes=shapes,
                              cost_model=cost_model)
    # In float32, Adam turns rounding-sized gradient differences into learning-rate-sized steps (3 steps
    # of Qwen3-MoE: 2e-5 under "auto"); plain SGD keeps them rounding-sized.
    optimizer = keras.optimizers.Adam(1e-3) if FLAGS.floatx == "float64" else keras.optimizers.SGD(0.1)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, data(np.random.default_rng(0))


def fit_steps(model, data, steps):
    """Seconds of each fit step after the first (each step's loss read back): steady steps only."""
    import keras
    import numpy as np

    x, y = data
    repeat = -(-steps * FLAGS.batch_size // len(y))
    x = keras.tree.map_structure(lambda a: np.concatenate([a] * repeat)[:steps * FLAGS.batch_size], x)
    y = np.concatenate([y] * repeat)[:steps * FLAGS.batch_size]
    return timed_fit(model, x, y, FLAGS.batch_size)["steps"]


def numerics(name, mesh, strategy):
    """(weights after --steps fit steps, plan or None, its blocks' configurations or None), in float64
    throughout (float64_throughout) unless --floatx=float32."""
    import contextlib

    import numpy as np

    import keras_lwp
    from keras_lwp.placement import to_host
    from tests.precision import float64_throughout

    with float64_throughout() if FLAGS.floatx == "float64" else contextlib.nullcontext():
        model, data = make(name, mesh, strategy)
        fit_steps(model, data, FLAGS.steps)
    weights = [np.asarray(to_host(v.value)) for v in model.weights]
    if strategy is None:
        return weights, None, None
    return weights, keras_lwp.strategy_of(model), blocks_of(model)


def timing(name, mesh):
    """({contender: median steady step seconds}, {strategy: its blocks' configurations}) of one device
    and each strategy, in float32, rounds interleaved (forward and reverse order in turn), each
    contender built and warmed up once."""
    import keras_lwp

    contenders = {"one device": make(name, mesh, None)}
    for strategy in FLAGS.strategies:
        contenders[strategy] = make(name, mesh, strategy)
    for model, data in contenders.values():
        fit_steps(model, data, 2)  # tracing
    blocks = {key: blocks_of(model)
              for key, (model, _) in contenders.items() if key != "one device"}
    medians = interleaved_medians(FLAGS.rounds, {
        key: (lambda key=key: fit_steps(*contenders[key], FLAGS.timed_steps)) for key in contenders})
    return medians, blocks


def blocks_of(model):
    """The configurations the plan of parallelized `model` gives its transformer blocks (the layers
    made of layers, which keras_lwp plans through their sub-layers)."""
    import keras_lwp

    plan = keras_lwp.strategy_of(model)
    composite = {layer.name for layer in model.layers if getattr(layer, "_layers", None)}
    return sorted({str(plan[name]) for name in plan if name in composite})


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np

    warnings.filterwarnings("ignore", category=keras_lwp.layers.UnknownLayerWarning)
    worst_all, slowest = 0.0, None
    for name in FLAGS.models:
        keras.config.set_floatx(FLAGS.floatx)
        keras.config.set_dtype_policy(FLAGS.floatx)
        reference, _, _ = numerics(name, None, None)
        scale = max(float(np.max(np.abs(w))) for w in reference if w.size)
        for mesh_text in FLAGS.meshes:
            mesh = dict(zip("xy", (int(s) for s in mesh_text.split("x"))))
            keras.config.set_floatx(FLAGS.floatx)
            keras.config.set_dtype_policy(FLAGS.floatx)
            for strategy in FLAGS.strategies:
                weights, plan, blocks = numerics(name, mesh, strategy)
                worst = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, weights)) / scale
                worst_all = max(worst_all, worst)
                split = sum(1 for c in plan.values() if c)
                print(f"{name:<6} {mesh_text:<4} {strategy:<5} {split}/{len(plan)} layers split, "
                      f"blocks {blocks}  "
                      f"worst weight error {worst:.1e}", flush=True)
            if FLAGS.rounds <= 0:
                continue
            keras.config.set_floatx("float32")
            keras.config.set_dtype_policy("float32")
            times, timed_blocks = timing(name, mesh)
            figures = "  ".join(f"{key} {seconds * 1e3:.0f} ms" for key, seconds in times.items())
            print(f"{name:<6} {mesh_text:<4} float32 plans: " + "  ".join(
                f"{key} blocks {plan}" for key, plan in timed_blocks.items()), flush=True)
            line = f"{name:<6} {mesh_text:<4} float32 steady step: {figures}"
            others = [times[s] for s in FLAGS.strategies if not s.startswith(("auto", "random"))]
            if "auto" in times and others:
                ratio = min(others) / times["auto"]
                slowest = ratio if slowest is None else min(slowest, ratio)
                line += f"  -> auto {ratio:.2f}x the best of the others"
            print(line, flush=True)
    tolerance = 1e-9 if FLAGS.floatx == "float64" else 1e-6
    print(f"goal: every model equal to one device within {tolerance:.0e} ({FLAGS.floatx}): "
          f"{'met' if worst_all <= tolerance else 'MISSED'} "
          f"(worst {worst_all:.1e})")
    if slowest is not None:
        baselines = ", ".join(s for s in FLAGS.strategies if not s.startswith(("auto", "random")))
        print(f"goal: auto at least as fast as the best of {baselines} "
              f"(within 5% noise) on every model and mesh: {'met' if slowest >= 0.95 else 'MISSED'} "
              f"(worst auto/best ratio {slowest:.2f}x)")


if __name__ == "__main__":
    app.run(main)
