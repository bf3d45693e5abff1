"""Keras layers keras_lwp had no rule for (since 2026-12-08 most have one: builtin.PerSampleRule and
kin), and keras.ops inside a user's layer, each in a small model
trained under plans on a 4x2 mesh of 8 logical CPUs against one device, in float64 (float32 where
TensorFlow has no float64 kernel).

    python -m benchmarks.check_ops                       # every case, "data" and a random plan
    python -m benchmarks.check_ops --cases=tril,top_k@split,TimeDistributed --strategies=data,model,random1

Each case runs in a process of its own, so a crash inside TensorFlow is reported, not fatal. Per case
and plan: the worst weight/prediction error relative to the largest weight (goal 1e-9; 1e-5 in
float32), or the error
parallelize or fit gave (a refusal by parallelize changes nothing; an error at fit means keras_lwp let
through an op DTensor cannot run). One device is plain Keras in the same process.
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["all"], "Names from LAYERS and OPS, or 'all', 'layers', 'ops'.")
flags.DEFINE_list("strategies", ["data", "random0"], "Plans: data, model, owt, auto, random<seed>.")
flags.DEFINE_string("case", None, "Run one case in this process (what the sweep's subprocesses do).")

IMAGE, SEQUENCE, VOLUME = (8, 8, 4), (6, 4), (4, 4, 4, 2)
# Keras layers that had no keras_lwp rule (run replicated, named in a warning; most now split by
# samples): name -> (input, call).
LAYERS = {
    "AdaptiveAveragePooling2D": (IMAGE, "L.AdaptiveAveragePooling2D((2, 2))(x)"),
    "AdaptiveMaxPooling1D": (SEQUENCE, "L.AdaptiveMaxPooling1D(4)(x)"),
    "Attention": (SEQUENCE, "L.Attention()([x, x])"),
    "AdditiveAttention": (SEQUENCE, "L.AdditiveAttention()([x, x])"),
    "GroupNormalization": (IMAGE, "L.GroupNormalization(groups=2)(x)"),
    "GroupQueryAttention": (SEQUENCE, "L.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2)(x, x)"),
    "Conv3D": (VOLUME, "L.Conv3D(4, 3, padding='same')(x)"),
    "Conv3DTranspose": (VOLUME, "L.Conv3DTranspose(2, 3, strides=2, padding='same')(x)"),
    "Cropping3D": (VOLUME, "L.Cropping3D(1)(x)"),
    "UpSampling3D": (VOLUME, "L.UpSampling3D(2)(x)"),
    "ZeroPadding3D": (VOLUME, "L.ZeroPadding3D(1)(x)"),
    "AveragePooling3D": (VOLUME, "L.AveragePooling3D(2)(x)"),
    "MaxPooling3D": (VOLUME, "L.MaxPooling3D(2)(x)"),
    "GlobalAveragePooling3D": (VOLUME, "L.GlobalAveragePooling3D()(x)"),
    "SpatialDropout3D": (VOLUME, "L.SpatialDropout3D(0.3)(x)"),
    "Dot": (SEQUENCE, "L.Dot(axes=-1)([x, x * 2.0])"),
    "Masking": (SEQUENCE, "L.LSTM(3)(L.Masking(0.0)(x))"),
    "TimeDistributed": (SEQUENCE, "L.TimeDistributed(L.Dense(3))(x)"),
    "UnitNormalization": (SEQUENCE, "L.UnitNormalization()(x)"),
    "SpectralNormalization": (SEQUENCE, "L.SpectralNormalization(L.Dense(3))(x)"),
    "Resizing": (IMAGE, "L.Resizing(5, 5)(x)"),
    "CenterCrop": (IMAGE, "L.CenterCrop(4, 6)(x)"),
    "RandomFlip": (IMAGE, "L.RandomFlip(seed=3)(x)"),
    "RandomRotation": (IMAGE, "L.RandomRotation(0.2, seed=3)(x)"),
    "RandomZoom": (IMAGE, "L.RandomZoom(0.2, seed=3)(x)"),
    "RandomTranslation": (IMAGE, "L.RandomTranslation(0.2, 0.2, seed=3)(x)"),
    "RandomContrast": (IMAGE, "L.RandomContrast(0.3, seed=3)(x)"),
    "RandomCrop": (IMAGE, "L.RandomCrop(6, 6, seed=3)(x)"),
    "Lambda": (SEQUENCE, "L.Lambda(lambda t: ops.cumsum(t, axis=1)[:, ::-1])(x)"),
    # Layers with rules whose own call ran ops DTensor lacks (dilations: SpaceToBatchND).
    "DilatedConv1D": (SEQUENCE, "L.Conv1D(4, 3, dilation_rate=2, padding='causal')(x)"),
    "DilatedConv2D": (IMAGE, "L.Conv2D(4, 3, dilation_rate=2, padding='same')(x)"),
    "DilatedDepthwiseConv2D": (IMAGE, "L.DepthwiseConv2D(3, dilation_rate=2, padding='same')(x)"),
    "DilatedSeparableConv2D": (IMAGE, "L.SeparableConv2D(6, 3, dilation_rate=2, padding='same')(x)"),
}
# TensorFlow has no float64 kernel for these (or Keras' layer casts to float32): float32, tolerance 1e-5.
FLOAT32 = {"AveragePooling3D", "MaxPooling3D", "RandomRotation"}
# keras.ops in a user's layer on the [8, 6, 4] activations `x`: "<name>" runs in a layer with no rule
# (replicated), "<name>@split" in a layer holding a Dense (a block: DTensor runs it split by samples).
OPS = {
    "sort": "ops.sort(x, axis=1)", "argsort": "ops.argsort(x, axis=1)", "top_k": "ops.top_k(x, 2)[0]",
    "cumsum": "ops.cumsum(x, axis=1)", "cumprod": "ops.cumprod(x, axis=2)", "flip": "ops.flip(x, axis=1)",
    "take": "ops.take(x, [0, 2, 5], axis=1)", "take_along_axis": "ops.take_along_axis(x, ops.argsort(x, axis=1), axis=1)",
    "einsum": "ops.einsum('bij,bkj->bik', x, x)", "tril": "ops.tril(x)", "triu": "ops.triu(x, 1)",
    "pad": "ops.pad(x, [[0, 0], [1, 2], [0, 1]])", "repeat": "ops.repeat(x, 2, axis=1)", "tile": "ops.tile(x, (1, 2, 1))",
    "split": "ops.concatenate(ops.split(x, 2, axis=1)[::-1], axis=1)",
    "unstack": "ops.stack(ops.unstack(x, axis=1)[::-1], axis=1)", "moveaxis": "ops.moveaxis(x, 1, 2)",
    "one_hot": "ops.one_hot(ops.argmax(x, axis=-1), 4) * x", "where": "ops.where(x > 0, x, 0.1 * x)",
    "logsumexp": "ops.logsumexp(x, axis=1)", "norm": "ops.norm(x, axis=-1)",
    "resize": "ops.image.resize(x[..., None], (12, 8))",
    "diagonal": "ops.diagonal(ops.einsum('bij,bkj->bik', x, x), axis1=1, axis2=2)",
    "diagonal_offset": "ops.diagonal(x, offset=1, axis1=1, axis2=2)",
    "cumprod_batch": "ops.cumprod(x, axis=0)",
    "batch_max": "ops.max(x, axis=0, keepdims=True) + x", "moments": "ops.nn.moments(x, axes=[1])[1]",
    "inv": "ops.linalg.inv(ops.eye(4, dtype=x.dtype) * 3 + ops.einsum('bij,bik->bjk', x, x) * 0.01)",
    "average_pool": "ops.nn.average_pool(x, 2, 2)", "max_pool": "ops.nn.max_pool(x, 3, 1, padding='same')",
    "conv": "ops.nn.conv(x, ops.ones((3, 4, 2), x.dtype), padding='same')",
    "depthwise_conv": "ops.nn.depthwise_conv(x, ops.ones((3, 4, 1), x.dtype), padding='same')",
    "conv_transpose": "ops.nn.conv_transpose(x, ops.ones((3, 2, 4), x.dtype), 2, padding='same')",
    "activations": "ops.nn.gelu(x) + ops.nn.silu(x) + ops.nn.log_softmax(x)",
    "roll": "ops.roll(x, 2, axis=1)", "roll_flat": "ops.roll(x, 3)", "roll_batch": "ops.roll(x, 1, axis=0)", "reverse_slice": "x[:, ::-1]",
    "new_axis": "x[:, None][:, 0] * x[None, ...][0] + x[..., None][..., 0]", "int_index": "ops.transpose(x, (1, 0, 2))[2]",
    "slice": "ops.slice(x, (0, 1, 0), (8, 3, 4))", "normalize": "ops.nn.normalize(x, axis=-1)",
    "median": "ops.reshape(ops.median(x, axis=1), (-1, 4))",  # TensorFlow's loses the static shape
    "quantile": "ops.reshape(ops.quantile(x, 0.3, axis=1), (-1, 4))",
    "fori_loop": "ops.fori_loop(0, 3, lambda i, v: v * 0.5 + 1.0, x)",
    "fori_loop_index": "ops.fori_loop(0, 3, lambda i, v: v * 0.5 + x[:, i, None], x)",
    "scan": "ops.transpose(ops.scan(lambda c, t: (c * 0.5 + t, c * t), ops.zeros_like(x[:, 0]), "
            "ops.transpose(x, (1, 0, 2)))[1], (1, 0, 2))",
    "scan_reverse": "ops.transpose(ops.scan(lambda c, t: (c + t, ops.tanh(c)), x[:, 0], ops.transpose(x, (1, 0, 2)), "
                    "reverse=True)[1], (1, 0, 2))",
    "map": "ops.transpose(ops.map(lambda t: t * ops.sigmoid(t), ops.transpose(x, (1, 0, 2))), (1, 0, 2))",
    "map_batch": "ops.map(lambda t: t * ops.sum(t), x)",
}


def run_case(name):
    """Prints one RESULT line per strategy for case `name`."""
    import warnings

    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np
    from keras import ops

    from keras_lwp.placement import to_host
    from tests.precision import float64

    warnings.simplefilter("ignore")
    L = keras.layers
    op, split = name.split("@")[0], name.endswith("@split")
    if name in LAYERS:
        shape, body = LAYERS[name]
    else:
        shape, body = SEQUENCE, "Op()(x)"

    class Op(L.Layer):
        def build(self, input_shape):
            if split:  # a layer made of layers: planned as a block, its own call split by samples
                self.inner = L.Dense(input_shape[-1], name="inner")
                self.inner.build(input_shape)

        def call(self, x):
            x = self.inner(x) if split else x
            return ops.cast(eval(OPS[op], {"ops": ops, "x": x}), x.dtype)  # noqa: S307  the case's expression

    def make():
        keras.utils.set_random_seed(1)
        inputs = keras.Input(shape, name="in")
        x = L.Dense(shape[-1], name="pre")(inputs)
        x = eval(body, {"L": L, "ops": ops, "x": x, "Op": Op})  # noqa: S307
        return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))

    def train(model, x, y):
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return [np.asarray(to_host(v.value)) for v in model.weights] + [model.predict(x, batch_size=8, verbose=0)]

    import contextlib

    tolerance = 1e-5 if name in FLOAT32 else 1e-9
    with contextlib.nullcontext() if name in FLOAT32 else float64():
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((16,) + shape), rng.integers(0, 3, 16)
        try:
            want = train(make(), x, y)
        except Exception as error:  # noqa: BLE001  what plain Keras cannot train is no case
            print(f"RESULT {name} - one device fails too: {type(error).__name__}", flush=True)
            return
        scale = max(float(np.max(np.abs(w))) for w in want if w.size)
        for strategy in FLAGS.strategies:
            model = make()
            mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
            plan = (keras_lwp.planner.random_strategy(model, mesh, 8, int(strategy[6:]))
                    if strategy.startswith("random") else strategy)
            try:
                keras_lwp.parallelize(model, mesh, strategy=plan, batch_size=8)
            except ValueError as error:
                print(f"RESULT {name} {strategy} refused by parallelize: {str(error)[:110]}", flush=True)
                continue
            try:
                got = train(model, x, y)
            except Exception as error:  # noqa: BLE001
                print(f"RESULT {name} {strategy} FAILED at fit: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:110]}", flush=True)
                continue
            error = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want)) / scale
            print(f"RESULT {name} {strategy} {error:.1e} {'equal' if error <= tolerance else 'DIFFERENT'}", flush=True)


def main(argv):
    del argv
    if FLAGS.case:
        run_case(FLAGS.case)
        return
    cases = []
    for entry in FLAGS.cases:
        cases += list(LAYERS) if entry in ("all", "layers") else []
        cases += [f"{op}{form}" for op in OPS for form in ("", "@split")] if entry in ("all", "ops") else []
        cases += [entry] if entry in LAYERS or entry.split("@")[0] in OPS else []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    counts = {"equal": 0, "refused": 0, "bad": 0}
    for name in cases:
        out = subprocess.run([sys.executable, "-m", "benchmarks.check_ops", f"--case={name}",
                              f"--strategies={','.join(FLAGS.strategies)}"], capture_output=True, text=True, cwd=root)
        lines = [line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode:
            lines.append(f"{name} CRASHED the process (exit {out.returncode})")
        for line in lines:
            print(line, flush=True)
            kind = ("equal" if line.endswith(" equal") else
                    "refused" if " refused by parallelize: " in line or " - one device fails too: " in line
                    else "bad")
            counts[kind] += 1
    print(f"goal: every case equal to one device (1e-9 in float64, 1e-5 in float32) or refused by parallelize, none failing at fit or "
          f"crashing: {'met' if not counts['bad'] else 'MISSED'} ({counts['equal']} equal, {counts['refused']} "
          f"refused or failing on one device too, {counts['bad']} failed, different or crashed)")


if __name__ == "__main__":
    app.run(main)
