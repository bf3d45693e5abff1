"""keras_hub vision backbones, built small from configurations with random weights (no download), a
Dense head over the flattened features, trained 2 Adam steps under a plan on a 4x2 mesh of 8 logical
CPUs against one device, in float64 (keras_hub's float32 casts too: tests.precision.float64_throughout).

    python -m benchmarks.check_hub_vision
    python -m benchmarks.check_hub_vision --models swin,hgnetv2 --strategy data

Per model: the plan's split count and the worst weight error relative to the largest weight (goal
1e-9), or the error parallelize refused the model with (a refusal changes nothing: the model still
trains on one device).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["deit", "dinov2", "resnet", "vgg", "densenet", "mit", "vitdet", "xception", "swin",
                             "hgnetv2", "deeplab_v3", "cspnet", "efficientnet", "mobilenet_v5", "dinov3"],
                  "keras_hub vision backbones (see BACKBONES).")
flags.DEFINE_string("strategy", "random0", "'auto', 'data', 'owt', 'model' or 'random<seed>' (a random valid plan).")

SIDE, BATCH = 32, 8
BACKBONES = {  # name: (class, keyword arguments)
    "deit": ("DeiTBackbone", dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64)),
    "dinov2": ("DINOV2Backbone", dict(patch_size=4, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                                      position_embedding_shape=(8, 8))),
    "resnet": ("ResNetBackbone", dict(input_conv_filters=[16], input_conv_kernel_sizes=[3],
                                      stackwise_num_filters=[64, 32], stackwise_num_blocks=[1, 1],
                                      stackwise_num_strides=[1, 2], block_type="bottleneck_block")),
    "vgg": ("VGGBackbone", dict(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16])),
    "densenet": ("DenseNetBackbone", dict(stackwise_num_repeats=[1, 1], growth_rate=8)),
    "mit": ("MiTBackbone", dict(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
                                layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3],
                                layerwise_strides=[4, 2], hidden_dims=[16, 32])),
    "vitdet": ("ViTDetBackbone", dict(hidden_size=32, num_layers=2, intermediate_dim=64, num_heads=2,
                                      global_attention_layer_indices=[1], patch_size=8, num_output_channels=16,
                                      window_size=2)),
    "xception": ("XceptionBackbone", dict(stackwise_conv_filters=[[8, 16], [16, 16]], stackwise_pooling=[True, False])),
    "swin": ("SwinTransformerBackbone", dict(embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
                                             patch_size=2)),
    "deeplab_v3": ("DeepLabV3Backbone", dict(spatial_pyramid_pooling_key="P3", low_level_feature_key="P2",
                                             upsampling_size=2, dilation_rates=[2, 3], projection_filters=8)),
    "hgnetv2": ("HGNetV2Backbone", dict(depths=[1, 1], embedding_size=16, hidden_sizes=[16, 32],
                                        stem_channels=[3, 8, 16], hidden_act="relu", use_learnable_affine_block=True,
                                        stackwise_stage_filters=[[16, 8, 16, 1, 2, 3], [16, 8, 32, 1, 2, 3]],
                                        apply_downsample=[False, True], use_lightweight_conv_block=[False, True])),
    "cspnet": ("CSPNetBackbone", dict(stem_filters=8, stem_kernel_size=3, stem_strides=1, stackwise_strides=2,
                                      stackwise_depth=[1, 2], stackwise_num_filters=[8, 16], down_growth=True,
                                      bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5), expand_ratio=(2.0, 1.0),
                                      block_type="dark_block", stage_type="csp", stem_padding="same")),
    "efficientnet": ("EfficientNetBackbone", dict(  # fused and unfused MBConv blocks, squeeze-and-excite
        stackwise_kernel_sizes=[3, 3, 3], stackwise_num_repeats=[1, 2, 1], stackwise_input_filters=[8, 8, 16],
        stackwise_output_filters=[8, 16, 24], stackwise_expansion_ratios=[1, 4, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25, 0.25], stackwise_strides=[1, 2, 2],
        stackwise_block_types=["fused", "unfused", "unfused"], stackwise_force_input_filters=[0] * 3,
        stackwise_nores_option=[False] * 3, stackwise_width_coefficients=[1.0] * 3,
        stackwise_depth_coefficients=[1.0] * 3, num_features=32, dropout=0.0)),
    "mobilenet_v5": ("MobileNetV5Backbone", dict(  # edge residual, universal inverted residual, multi-query attention
        stackwise_block_types=[["er"], ["uir", "mqa"]], stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[16], [32, 32]], stackwise_strides=[[2], [2, 1]],
        stackwise_act_layers=[["relu"], ["relu", "relu"]], stackwise_exp_ratios=[[4.0], [4.0, 0.0]],
        stackwise_se_ratios=[[0.0], [0.0, 0.0]], stackwise_dw_kernel_sizes=[[0], [5, 0]],
        stackwise_dw_start_kernel_sizes=[[0], [3, 0]], stackwise_dw_end_kernel_sizes=[[0], [3, 0]],
        stackwise_exp_kernel_sizes=[[3], [0, 0]], stackwise_pw_kernel_sizes=[[1], [0, 0]],
        stackwise_num_heads=[[0], [0, 2]], stackwise_key_dims=[[0], [0, 8]], stackwise_value_dims=[[0], [0, 8]],
        stackwise_kv_strides=[[0], [0, 2]], stackwise_use_cpe=[[False], [False, False]], stem_size=8,
        num_features=32, use_msfa=False)),
    "dinov3": ("DINOV3Backbone", dict(patch_size=4, num_layers=2, hidden_dim=32, num_heads=2, intermediate_dim=64,
                                      num_register_tokens=2, use_gated_mlp=True)),
}


def build(name):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    cls, kwargs = BACKBONES[name]
    if cls == "DeepLabV3Backbone":  # atrous (dilated) convolutions over a ResNet encoder's pyramid
        encoder = keras_hub.models.ResNetBackbone(image_shape=(SIDE, SIDE, 3), **BACKBONES["resnet"][1])
        kwargs = dict(kwargs, image_encoder=encoder)
    image = "input_shape" if cls == "EfficientNetBackbone" else "image_shape"  # its own keyword for it
    backbone = getattr(keras_hub.models, cls)(**{image: (SIDE, SIDE, 3)}, **kwargs)
    features = backbone.output
    if isinstance(features, dict):  # a feature pyramid: its last level
        features = list(features.values())[-1]
    return keras.Model(backbone.input, keras.layers.Dense(10, name="head")(keras.layers.Flatten()(features)))


def train(name, x, y, strategy):
    """(weights after one epoch of 2 steps, plan or None)."""
    import keras
    import numpy as np

    import keras_lwp
    from keras_lwp.placement import to_host

    model = build(name)
    if strategy is not None:
        mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
        if strategy.startswith("random"):
            strategy = keras_lwp.planner.random_strategy(model, mesh, BATCH, int(strategy[6:]))
        keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=BATCH)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    plan = keras_lwp.strategy_of(model) if strategy is not None else None
    return [np.asarray(to_host(v.value)) for v in model.weights], plan


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import warnings

    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import numpy as np

    from tests.precision import float64, float64_throughout

    warnings.filterwarnings("ignore", category=keras_lwp.layers.UnknownLayerWarning)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2 * BATCH, SIDE, SIDE, 3)), rng.integers(0, 10, 2 * BATCH)
    worst_all = 0.0
    for name in FLAGS.models:
        with float64(), float64_throughout():
            reference, _ = train(name, x, y, None)
            try:
                weights, plan = train(name, x, y, FLAGS.strategy)
            except (ValueError, NotImplementedError) as error:
                print(f"{name:<9} refused: {error}", flush=True)
                continue
        scale = max(float(np.max(np.abs(w))) for w in reference if w.size)
        worst = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, weights)) / scale
        worst_all = max(worst_all, worst)
        print(f"{name:<9} {FLAGS.strategy} {sum(1 for c in plan.values() if c)}/{len(plan)} layers split  "
              f"worst weight error {worst:.1e}", flush=True)
    print(f"goal: every model that parallelizes equal to one device within 1e-9 (float64): "
          f"{'met' if worst_all <= 1e-9 else 'MISSED'} (worst {worst_all:.1e})")


if __name__ == "__main__":
    app.run(main)
