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

import math

from keras_lwp.layers.base import DimSpec, LayerRule, register_rule

SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _weight_axes(info, mapping):
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
    "Identity", "ActivityRegularization", "SpatialDropout1D", "SpatialDropout2D",
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
            DimSpec(name, out.shape[axis], axis, _forward_backward_inputs(info.calls[0], rank, axis),
                    tuple(None for _ in info.weights))
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
                dims.append(DimSpec("channel", out.shape[position], position, (position,),
                                    tuple(0 for _ in info.weights)))
            else:
                dims.append(DimSpec(name if name != "channel" else "axis%d" % position, out.shape[position],
                                    position, (position,), tuple(None for _ in info.weights), stats=True))
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
        dims = [DimSpec("sample", y.shape[0], 0, (0,), none)]
        if rank == 3:
            dims.append(DimSpec("length", y.shape[1], 1, (1,), none))
        dims.append(DimSpec("channel", y.shape[-1], rank - 1, (None,),
                            _weight_axes(info, {"kernel": 1, "bias": 0})))
        dims.append(DimSpec("reduction", x.shape[-1], None, (len(x.shape) - 1,),
                            _weight_axes(info, {"kernel": 0})))
        return dims

    def forward_flops(self, info, call):
        return 2.0 * math.prod(call.outputs[0].shape) * call.inputs[0].shape[-1]


class EinsumDenseRule(LayerRule):
    """Sample-parallel: the batch axis of input and output; the kernel stays whole."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec("sample", y.shape[0], 0, (0,), tuple(None for _ in info.weights))]

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
            return [DimSpec("sample", out.shape[0], 0, (0,), none)]
        dims = [DimSpec("sample", out.shape[0], 0, (0,), none)]
        kernel, strides, dilation = self.window(info)
        for i, name in enumerate(SPATIAL_NAMES[rank - 2]):
            extent = (kernel[i] - 1) * dilation[i] + 1
            halo = max(0, extent - strides[i])
            if x.shape[1 + i] % max(1, strides[i]) == 0:
                dims.append(DimSpec(name, out.shape[1 + i], 1 + i, (1 + i,), none, halo=halo, native=False))
        dims.extend(self.channel_dims(info, rank))
        return dims


def _tuple(value, rank):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


class ConvRule(_WindowRule):
    """Convolutions: sample, spatial (with a halo of kernel-1 rows) and output channel."""

    def window(self, info):
        rank = len(info.output.shape) - 2
        return (_tuple(info.config["kernel_size"], rank), _tuple(info.config["strides"], rank),
                _tuple(info.config.get("dilation_rate", 1), rank))

    def channel_dims(self, info, rank):
        if info.config.get("groups", 1) != 1:
            return []
        return [DimSpec("channel", info.output.shape[-1], rank - 1, (None,),
                        _weight_axes(info, {"kernel": -1, "bias": 0}), native=False)]

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
            dims = [DimSpec(d.name, d.size, d.output, d.inputs, d.weights, d.halo, d.stats, False) for d in dims]
        return dims

    def window(self, info):
        rank = len(info.output.shape) - 2
        pool = _tuple(info.config["pool_size"], rank)
        strides = info.config.get("strides") or pool
        return pool, _tuple(strides, rank), (1,) * rank

    def channel_dims(self, info, rank):
        return [DimSpec("channel", info.output.shape[-1], rank - 1, (rank - 1,), (), native=False)]

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
        return [DimSpec("sample", y.shape[0], 0, (0,), tuple(None for _ in info.weights), native=False)]

    def forward_flops(self, info, call):
        kernels = sum(math.prod(w.shape) for w in info.weights if "kernel" in w.name)
        spatial = math.prod(call.outputs[0].shape[:-1])
        return 2.0 * spatial * kernels


@register_rule("Flatten", "Reshape", "Permute", "RepeatVector")
class SampleOnlyRule(LayerRule):
    """Layers that rearrange all but the batch axis: split along the sample only."""

    def dimensions(self, info):
        y = info.output
        return [DimSpec("sample", y.shape[0], 0, tuple(0 for _ in info.inputs), ())]

    def forward_flops(self, info, call):
        return 0.0


@register_rule("GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D",
               "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D")
class SampleChannelRule(LayerRule):
    """Layers that change the spatial axes but keep sample and channel."""

    def dimensions(self, info):
        y, x = info.output, info.inputs[0]
        if info.config.get("data_format", "channels_last") != "channels_last":
            return [DimSpec("sample", y.shape[0], 0, (0,), ())]
        return [DimSpec("sample", y.shape[0], 0, (0,), ()),
                DimSpec("channel", y.shape[-1], len(y.shape) - 1, (len(x.shape) - 1,), ())]

    def forward_flops(self, info, call):
        return float(math.prod(call.inputs[0].shape))


class EmbeddingRule(LayerRule):
    """Table lookup: split the ids (sample, length), the embedding (channel) or the vocabulary rows."""

    def dimensions(self, info):
        y = info.output
        rank = len(y.shape)
        dims = [DimSpec("sample", y.shape[0], 0, (0,), (None,))]
        if rank == 3:
            dims.append(DimSpec("length", y.shape[1], 1, (1,), (None,)))
        dims.append(DimSpec("channel", y.shape[-1], rank - 1, (None,), (1,), native=False))
        dims.append(DimSpec("vocabulary", info.weights[0].shape[0], None, (None,), (0,), native=False))
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
        heads = _weight_axes(info, {
            "query/kernel": 1, "key/kernel": 1, "value/kernel": 1,
            "query/bias": 0, "key/bias": 0, "value/bias": 0, "attention_output/kernel": 0,
        })
        none = tuple(None for _ in info.weights)
        dims = [DimSpec("sample", y.shape[0], 0, tuple(0 for _ in range(inputs)), none)]
        if query_rank == 3:
            dims.append(DimSpec("length", y.shape[1], 1, (1,) + (None,) * (inputs - 1), none))
        dims.append(DimSpec("heads", info.config["num_heads"], None, (None,) * inputs, heads))
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
        return [DimSpec(name, y.shape[axis], axis, (), ()) for name, axis in positional_dims(y.shape)]

    def forward_flops(self, info, call):
        return 0.0
