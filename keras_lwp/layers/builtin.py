"""Rules for the Keras layers keras_lwp knows, one per layer kind (docs/design.md's table).

| kind                           | dimensions                                        |
| ------------------------------ | ------------------------------------------------- |
| Dense                          | sample, (length), channel, reduction              |
| Conv1D / Conv2D                | sample, length or height/width, channel           |
| pooling                        | sample, length or height/width, channel           |
| Embedding                      | sample, length, channel, vocabulary               |
| MultiHeadAttention             | sample, length (of the query), heads              |
| elementwise, norm, activation  | whatever the output has (minus reduced axes)      |
| reshape, flatten, global pool  | sample (and channel where it survives)            |
"""

import dataclasses
import math

from keras_lwp.layers.base import COSTED, DimSpec, LayerRule, register_rule

SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def weight_axes(info, mapping):
    """Per weight, the axis given by `mapping` for the first suffix that matches its path."""
    axes = []
    for weight in info.weights:
        axis = None
        for suffix, value in mapping.items():
            if weight.name.endswith(suffix):
                axis = value
                break
        axes.append(axis)
    return tuple(axes)


def positional_dims(shape, skip=()):
    """Names for the axes of a batch-first, channels-last tensor: sample, spatial..., channel."""
    rank = len(shape)
    if rank == 1:
        names = ["sample"]
    elif rank == 2:
        names = ["sample", "channel"]
    else:
        spatial = SPATIAL_NAMES.get(rank - 2, tuple(f"axis{i}" for i in range(1, rank - 1)))
        names = ["sample", *spatial, "channel"]
    return [(name, axis) for axis, name in enumerate(names) if axis not in skip]


def _forward_backward_inputs(call, rank, axis):
    """Per input: `axis` when the input has the output's rank, else None (broadcast operand)."""
    return tuple(axis if len(t.shape) == rank else None for t in call.inputs)


@register_rule(
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Dropout", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Rescaling",
    "Identity", "ActivityRegularization", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    # keras.applications' pointwise layers: Normalization (x - mean) / sqrt(var), ConvNeXt's LayerScale
    # x * gamma, InceptionResNetV2's CustomScaleLayer x + y * scale; their per-channel weights stay whole.
    "Normalization", "LayerScale", "CustomScaleLayer",
)
class ElementwiseRule(LayerRule):
    """Pointwise layers: every dimension of the output, inputs split alike."""

    reduced_axes = ()

    def skip(self, info):
        return self.reduced_axes

    def dimensions(self, info):
        out = info.output
        rank = len(out.shape)
        skip = {a % rank for a in self.skip(info)}
        return [
            DimSpec(name=name, size=out.shape[axis], output=axis,
                    inputs=_forward_backward_inputs(info.calls[0], rank, axis),
                    weights=tuple(None for _ in info.weights))
            for name, axis in positional_dims(out.shape, skip)
        ]

    def forward_flops(self, info, call):
        return float(sum(math.prod(t.shape) for t in call.outputs) * max(1, len(call.inputs)))


class _ReducingRule(ElementwiseRule):
    """Pointwise layers that reduce over their `axis` (config): those axes stay whole."""

    flops_per_element = 5.0

    def skip(self, info):
        axis = info.config.get("axis", -1)
        return tuple(axis) if isinstance(axis, (list, tuple)) else (axis,)

    def forward_flops(self, info, call):
        return self.flops_per_element * math.prod(call.outputs[0].shape)


@register_rule("Softmax", "Concatenate")
class AxisRule(_ReducingRule):
    """Softmax normalizes along `axis`; Concatenate joins along it."""


@register_rule("UnitNormalization", "Masking")
class UnitNormalizationRule(_ReducingRule):
    """UnitNormalization divides by the norm over its axes; Masking masks the positions whose every
    channel (the last axis) equals its mask value: those axes stay whole."""


@register_rule("LayerNormalization")
class LayerNormalizationRule(_ReducingRule):
    """Normalizes over its axes, which stay whole; gamma/beta gradients sync over the rest."""

    flops_per_element = 8.0


@register_rule("BatchNormalization")
class BatchNormalizationRule(LayerRule):
    """Statistics over every axis but the channel: a split of those reduces the (small) statistics."""

    def dimensions(self, info):
        out = info.output
        rank = len(out.shape)
        axis = info.config.get("axis", -1)
        axis = axis[0] if isinstance(axis, (list, tuple)) else axis
        channel_axis = axis % rank
        dims = []
        for name, position in positional_dims(out.shape):
            if position == channel_axis:
                dims.append(DimSpec(name="channel", size=out.shape[position], output=position, inputs=(position,),
                                    weights=tuple(0 for _ in info.weights)))
            else:
                dims.append(DimSpec(name=name if name != "channel" else "axis%d" % position, size=out.shape[position],
                                    output=position, inputs=(position,), weights=tuple(None for _ in info.weights),
                                    stats=True))
        return dims

    def forward_flops(self, info, call):
        return 8.0 * math.prod(call.outputs[0].shape)


@register_rule("Dense")
class DenseRule(LayerRule):
    """y = x @ kernel + bias over the last axis: column-parallel (channel) or row-parallel (reduction)."""

    def dimensions(self, info):
        x, y = info.inputs[0], info.output
        rank = len(y.shape)
        none = tuple(None for _ in info.weights)
        dims = [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=none)]
        if rank == 3:
            dims.append(DimSpec(name="length", size=y.shape[1], output=1, inputs=(1,), weights=none))
        dims.append(DimSpec(name="channel", size=y.shape[-1], output=rank - 1, inputs=(None,),
                            weights=weight_axes(info, {"kernel": 1, "bias": 0})))
        dims.append(DimSpec(name="reduction", size=x.shape[-1], output=None, inputs=(len(x.shape) - 1,),
                            weights=weight_axes(info, {"kernel": 0})))
        return dims

    def forward_flops(self, info, call):
        return 2.0 * math.prod(call.outputs[0].shape) * call.inputs[0].shape[-1]


class EinsumDenseRule(LayerRule):
    """Sample-parallel: the batch axis of input and output; the kernel stays whole."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,),
                        weights=tuple(None for _ in info.weights))]

    def forward_flops(self, info, call):
        kernel = next((w for w in info.weights if w.name.endswith("kernel")), None)
        contracted = math.prod(kernel.shape) / max(1, call.outputs[0].shape[-1]) if kernel else 1
        return 2.0 * math.prod(call.outputs[0].shape) * contracted


class _WindowRule(LayerRule):
    """Layers that slide a window over the spatial axes of a channels-last tensor."""

    def window(self, info):
        raise NotImplementedError

    def channel_dims(self, info, rank):
        raise NotImplementedError

    def dimensions(self, info):
        out, x = info.output, info.inputs[0]
        rank = len(out.shape)
        none = tuple(None for _ in info.weights)
        if info.config.get("data_format", "channels_last") != "channels_last":
            return [DimSpec(name="sample", size=out.shape[0], output=0, inputs=(0,), weights=none)]
        dims = [DimSpec(name="sample", size=out.shape[0], output=0, inputs=(0,), weights=none)]
        kernel, strides, dilation = self.window(info)
        for i, name in enumerate(SPATIAL_NAMES[rank - 2]):
            extent = (kernel[i] - 1) * dilation[i] + 1
            halo = max(0, extent - strides[i])
            if x.shape[1 + i] % max(1, strides[i]) == 0:
                dims.append(DimSpec(name=name, size=out.shape[1 + i], output=1 + i, inputs=(1 + i,), weights=none,
                                    halo=halo, runs=COSTED))
        dims.extend(self.channel_dims(info, rank))
        return dims


def as_tuple(value, rank):
    """A window setting (kernel_size, strides, ...) as one value per spatial dimension."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


def padding_of(info):
    """A windowed layer's padding, lower case ('valid' when its config has none)."""
    return str(info.config.get("padding", "valid")).lower()


class ConvRule(_WindowRule):
    """Convolutions: sample, spatial (with a halo of kernel-1 rows) and output channel."""

    def window(self, info):
        rank = len(info.output.shape) - 2
        return (as_tuple(info.config["kernel_size"], rank), as_tuple(info.config["strides"], rank),
                as_tuple(info.config.get("dilation_rate", 1), rank))

    def channel_dims(self, info, rank):
        if info.config.get("groups", 1) != 1:
            return []
        return [DimSpec(name="channel", size=info.output.shape[-1], output=rank - 1, inputs=(None,),
                        weights=weight_axes(info, {"kernel": -1, "bias": 0}), runs=COSTED)]

    def forward_flops(self, info, call):
        kernel = next(w for w in info.weights if w.name.endswith("kernel"))
        return 2.0 * math.prod(call.outputs[0].shape) * math.prod(kernel.shape[:-1]) / info.config.get("groups", 1)


class PoolRule(_WindowRule):
    """Pooling windows: sample, spatial (halo of window - stride) and channel."""

    def dimensions(self, info):
        dims = super().dimensions(info)
        if info.class_name.startswith("Average"):
            # AvgPoolGrad has no DTensor layout rule; run "replicated" on a batch-split gradient it
            # trained InceptionV3's pooled branches wrong (kernels off by 7e-2). Costed, not run.
            dims = [dataclasses.replace(d, runs=COSTED) for d in dims]
        return dims

    def window(self, info):
        rank = len(info.output.shape) - 2
        pool = as_tuple(info.config["pool_size"], rank)
        strides = info.config.get("strides") or pool
        return pool, as_tuple(strides, rank), (1,) * rank

    def channel_dims(self, info, rank):
        return [DimSpec(name="channel", size=info.output.shape[-1], output=rank - 1, inputs=(rank - 1,), weights=(),
                        runs=COSTED)]

    def forward_flops(self, info, call):
        pool, _, _ = self.window(info)
        return float(math.prod(call.outputs[0].shape) * math.prod(pool))


@register_rule("SeparableConv2D", "SeparableConv1D",
               "Conv2DTranspose", "Conv1DTranspose")
class SampleOnlyConvRule(ConvRule):
    """Convolutions DTensor cannot differentiate sharded: DepthwiseConv2dNativeBackpropFilter has no
    layout rule, and run "replicated" on a batch-split input it returned one shard's gradient
    (MobileNetV2's depthwise kernels trained off by 2e-2). The sample split is costed but not run."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,),
                        weights=tuple(None for _ in info.weights), runs=COSTED)]

    def forward_flops(self, info, call):
        kernels = sum(math.prod(w.shape) for w in info.weights if "kernel" in w.name)
        spatial = math.prod(call.outputs[0].shape[:-1])
        return 2.0 * spatial * kernels


@register_rule("Flatten", "Reshape", "Permute", "RepeatVector")
class SampleOnlyRule(LayerRule):
    """Layers that rearrange all but the batch axis: split along the sample only."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=tuple(0 for _ in info.inputs),
                        weights=tuple(None for _ in info.weights))]

    def forward_flops(self, info, call):
        return 0.0


@register_rule("GroupNormalization", "Attention", "AdditiveAttention", "Dot", "Conv3D", "Conv3DTranspose",
               "MaxPooling3D", "AveragePooling3D", "Resizing", "CenterCrop",
               "AdaptiveAveragePooling1D", "AdaptiveAveragePooling2D", "AdaptiveAveragePooling3D",
               "AdaptiveMaxPooling1D", "AdaptiveMaxPooling2D", "AdaptiveMaxPooling3D")
class PerSampleRule(SampleOnlyRule):
    """Keras layers that compute each sample apart, run by their own call split by samples (weights
    whole, their gradients all-reduced). Each ran equal to one device so inside a block
    (benchmarks/check_ops), and its rule numerics test checks every configuration; with no rule they
    ran whole on every device, and a data-parallel plan gathered the batch before them."""

    def forward_flops(self, info, call):
        y = call.outputs[0]
        kernels = sum(math.prod(w.shape) for w in info.weights if len(w.shape) >= 3)
        if kernels:  # a convolution: every kernel entry at every output position
            return 2.0 * math.prod(y.shape[:-1]) * kernels
        if info.class_name in ("Attention", "AdditiveAttention", "Dot") and len(call.inputs[0].shape) == 3:
            (batch, queries, width), values = call.inputs[0].shape, call.inputs[1].shape[1]
            return 4.0 * batch * queries * values * width  # scores and the weighted sum
        return 5.0 * float(sum(math.prod(t.shape) for t in (*call.inputs, *call.outputs)))


@register_rule("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D", "GlobalMaxPooling1D",
               "GlobalMaxPooling2D", "GlobalMaxPooling3D", "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
               "Cropping1D", "Cropping2D", "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D")
class SampleChannelRule(LayerRule):
    """Layers that change the spatial axes but keep sample and channel."""

    def dimensions(self, info):
        y, x = info.output, info.inputs[0]
        if info.config.get("data_format", "channels_last") != "channels_last":
            return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=())]
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=()),
                DimSpec(name="channel", size=y.shape[-1], output=len(y.shape) - 1, inputs=(len(x.shape) - 1,),
                        weights=())]

    def forward_flops(self, info, call):
        return float(math.prod(call.inputs[0].shape))


class EmbeddingRule(LayerRule):
    """Table lookup: split the ids (sample, length), the embedding (channel) or the vocabulary rows."""

    def dimensions(self, info):
        y = info.output
        rank = len(y.shape)
        dims = [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=(None,))]
        if rank == 3:
            dims.append(DimSpec(name="length", size=y.shape[1], output=1, inputs=(1,), weights=(None,)))
        dims.append(DimSpec(name="channel", size=y.shape[-1], output=rank - 1, inputs=(None,), weights=(1,),
                            runs=COSTED))
        dims.append(DimSpec(name="vocabulary", size=info.weights[0].shape[0], output=None, inputs=(None,),
                            weights=(0,), runs=COSTED))
        return dims

    def forward_flops(self, info, call):
        return float(math.prod(call.outputs[0].shape))


@register_rule("MultiHeadAttention")
class MultiHeadAttentionRule(LayerRule):
    """Self/cross attention: sample, the query length (keys and values stay whole), and heads
    (projections split by head, the output projection a partial sum: Megatron-style)."""

    def dimensions(self, info):
        y = info.output
        query_rank = len(info.inputs[0].shape)
        inputs = len(info.inputs)
        heads = weight_axes(info, {
            "query/kernel": 1, "key/kernel": 1, "value/kernel": 1,
            "query/bias": 0, "key/bias": 0, "value/bias": 0, "attention_output/kernel": 0,
        })
        none = tuple(None for _ in info.weights)
        dims = [DimSpec(name="sample", size=y.shape[0], output=0, inputs=tuple(0 for _ in range(inputs)), weights=none)]
        if query_rank == 3:
            dims.append(DimSpec(name="length", size=y.shape[1], output=1, inputs=(1,) + (None,) * (inputs - 1),
                                weights=none))
        dims.append(DimSpec(name="heads", size=info.config["num_heads"], output=None, inputs=(None,) * inputs,
                            weights=heads))
        return dims

    def forward_flops(self, info, call):
        q = call.inputs[0].shape
        v = call.inputs[1].shape if len(call.inputs) > 1 else q
        n, lq, lv = q[0], math.prod(q[1:-1]), math.prod(v[1:-1])
        h, dk = info.config["num_heads"], info.config["key_dim"]
        dv = info.config.get("value_dim") or dk
        d_out = call.outputs[0].shape[-1]
        projections = 2 * n * (lq * q[-1] * h * dk + lv * v[-1] * h * (dk + dv) + lq * h * dv * d_out)
        attention = 2 * n * h * lq * lv * (dk + dv)
        return float(projections + attention)


@register_rule("InputLayer")
class InputRule(LayerRule):
    """The data fed to the model, split as the first layers want it."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec(name=name, size=y.shape[axis], output=axis, inputs=(),
                        weights=()) for name, axis in positional_dims(y.shape)]

    def forward_flops(self, info, call):
        return 0.0
