"""keras_hub backbones, built from configurations with random weights (no download), planned by
"auto" on 4x2 and on 8 logical CPU devices, trained against one device in float64.

    python -m benchmarks.check_hub
    python -m benchmarks.check_hub --models bert,gpt2 --steps 6

For each model and mesh: the plan's splits (how many layers split, which split each transformer block
runs), the worst weight error after `--steps` fit steps relative to the largest weight (goal: 1e-9),
and the median time of the steps after the first (each step's loss read back) for one device, "data",
"owt" and "auto", all in this process (8 logical devices on this machine's cores, float64: the figures
compare strategies with each other, not with a float32 run on a real accelerator).
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["bert", "gpt2", "llama", "vit"], "keras_hub backbones.")
flags.DEFINE_list("meshes", ["4x2", "8"], "Meshes to plan on.")
flags.DEFINE_list("strategies", ["data", "owt", "auto"], "Strategies timed beside one device.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("length", 64, "Sequence length (image side / 2 for ViT).")
flags.DEFINE_integer("steps", 4, "fit steps (the first is left out of the timing).")

VOCABULARY = 512


def build(name):
    """(model, input_shapes, data(rng) -> (x, y)) of a small keras_hub backbone with a head and a loss."""
    import keras
    import keras_hub
    import numpy as np

    length, batch = FLAGS.length, FLAGS.batch_size * 2
    common = dict(num_layers=2, hidden_dim=128, intermediate_dim=256)
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
    else:  # a Llama-style decoder: rotary embeddings, grouped-query attention, gated feed-forward, RMS norms
        backbone = keras_hub.models.LlamaBackbone(vocabulary_size=VOCABULARY, num_query_heads=4, num_key_value_heads=2,
                                                  **common)
    logits = keras.layers.Dense(VOCABULARY, name="lm_head")(backbone.output)
    model = keras.Model(backbone.input, logits)
    shapes = {"token_ids": (length,), "padding_mask": (length,)}

    def data(rng):  # a causal LM: predict each next token
        tokens = rng.integers(0, VOCABULARY, (batch, length + 1))
        return {"token_ids": tokens[:, :-1], "padding_mask": np.ones((batch, length), int)}, tokens[:, 1:]

    return model, shapes, data


def run(name, mesh, strategy):
    """(weights after the steps, median step seconds after the first, plan or None)."""
    import keras
    import numpy as np

    import keras_lwp
    from keras_lwp.placement import to_host

    keras.utils.set_random_seed(0)
    model, shapes, data = build(name)
    if strategy is not None:
        keras_lwp.parallelize(model, keras_lwp.make_mesh(mesh), strategy=strategy, batch_size=FLAGS.batch_size,
                              input_shapes=shapes)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(np.random.default_rng(0))
    ends = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # the step's result read back: the step is done
            ends.append(time.perf_counter())

    repeat = max(1, FLAGS.steps * FLAGS.batch_size // len(y))
    x = keras.tree.map_structure(lambda a: np.concatenate([a] * repeat), x)
    y = np.concatenate([y] * repeat)
    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[StepTimer()])
    steps = [b - a for a, b in zip(ends, ends[1:])]
    plan = keras_lwp.strategy_of(model) if strategy is not None else None
    return [np.asarray(to_host(v.value)) for v in model.weights], statistics.median(steps), plan


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    warnings.filterwarnings("ignore", category=keras_lwp.layers.UnknownLayerWarning)
    worst_all = 0.0
    for name in FLAGS.models:
        reference, one_device, _ = run(name, None, None)
        scale = max(float(np.max(np.abs(w))) for w in reference if w.size)
        for mesh_text in FLAGS.meshes:
            sizes = [int(s) for s in mesh_text.split("x")]
            mesh = dict(zip("xy", sizes))
            times = {}
            for strategy in FLAGS.strategies:
                weights, seconds, plan = run(name, mesh, strategy)
                worst = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, weights)) / scale
                worst_all = max(worst_all, worst)
                times[strategy] = seconds
                split = sum(1 for c in plan.values() if c)
                blocks = sorted({str(plan[n]) for n in plan if n.startswith(("transformer", "vit_encoder"))})
                print(f"{name:<6} {mesh_text:<4} {strategy:<5} {split}/{len(plan)} layers split, blocks {blocks}  "
                      f"worst weight error {worst:.1e}  step {seconds * 1e3:.0f} ms", flush=True)
            best = min(times[s] for s in times if s != "auto") if len(times) > 1 else None
            ratio = f", auto {best / times['auto']:.2f}x the best of the others" if best and "auto" in times else ""
            print(f"{name:<6} {mesh_text:<4} one device {one_device * 1e3:.0f} ms/step{ratio}", flush=True)
    print(f"goal: every model equal to one device within 1e-9 (float64): {'met' if worst_all <= 1e-9 else 'MISSED'} "
          f"(worst {worst_all:.1e})")


if __name__ == "__main__":
    app.run(main)
