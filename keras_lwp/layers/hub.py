"""keras_hub's leaf layers (and Keras' own ReversibleEmbedding and RMSNormalization), by class name:
keras_hub is never imported here, so these rules cost nothing when it is not installed.

- ReversibleEmbedding: a token embedding that the language-model head may call again in reverse
  (hidden states times the table's transpose). Either way the samples and the sequence split: the
  ids (or hidden states) by blocks, the table whole.
- PositionEmbedding: its output is its table broadcast over the batch (the input gives only the
  shape): split by samples, or by channels (the table by columns). A call with explicit `positions`
  or a `start_index` runs whole.
- The RMS and layer norms of keras_hub's decoders (Llama, Mistral, Qwen, Phi-3, T5, Gemma) and
  keras.layers.RMSNormalization: normalize over the last axis, so every other axis splits, like
  LayerNormalization.
"""

import math

from keras_lwp.layers.base import DimSpec, LayerRule, register_rule
from keras_lwp.layers.builtin import LayerNormalizationRule


def _call_kwargs(call):
    """The keyword arguments the model passes in this call (empty when the graph does not say)."""
    arguments = getattr(call.node, "arguments", None)
    return dict(getattr(arguments, "kwargs", None) or {})


@register_rule("ReversibleEmbedding")
class ReversibleEmbeddingRule(LayerRule):
    """Token lookup forward, x @ table^T in reverse: sample and length splits, the table whole."""

    def dimensions(self, info):
        y = info.output
        if any(len(call.outputs[0].shape) != len(y.shape) for call in info.calls):
            return []
        none = tuple(None for _ in info.weights)
        dims = [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=none)]
        if len(y.shape) == 3:
            dims.append(DimSpec(name="length", size=y.shape[1], output=1, inputs=(1,), weights=none))
        return dims

    def trained_weights(self, info):
        """The table gets a gradient from a lookup (or a tied reverse call); an untied reverse table
        only from a reverse call: a backbone whose LM head is another layer never trains it."""
        reverse = any(_call_kwargs(call).get("reverse") for call in info.calls)
        forward = any(not _call_kwargs(call).get("reverse") for call in info.calls)
        untied = any(w.name.endswith("reverse_embeddings") for w in info.weights)
        used = []
        for w in info.weights:
            used.append(w.trainable and (reverse if w.name.endswith("reverse_embeddings") else forward or not untied))
        return tuple(used)

    def forward_flops(self, info, call):
        out = call.outputs[0]
        if _call_kwargs(call).get("reverse"):
            return 2.0 * math.prod(call.inputs[0].shape) * out.shape[-1]
        return float(math.prod(out.shape))


@register_rule("PositionEmbedding")
class PositionEmbeddingRule(LayerRule):
    """The table's first L rows broadcast to (batch, L, channels): sample or channel splits."""

    def dimensions(self, info):
        y = info.output
        if len(y.shape) != 3 or len(info.weights) != 1:
            return []
        for call in info.calls:
            kwargs = _call_kwargs(call)
            start = kwargs.get("start_index", 0)
            if kwargs.get("positions") is not None or not isinstance(start, int) or start != 0:
                return []  # rows picked at run time (a tensor start or positions): run whole
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=(None,)),
                DimSpec(name="channel", size=y.shape[2], output=2, inputs=(2,), weights=(1,))]

    def forward_flops(self, info, call):
        return float(math.prod(call.outputs[0].shape))


@register_rule("RMSNormalization", "LlamaLayerNorm", "MistralLayerNormalization", "QwenLayerNorm", "Phi3LayerNorm",
               "T5LayerNorm")
class LastAxisNormRule(LayerNormalizationRule):
    """Normalizes over the last axis (RMS or mean/variance), its scale per channel: every other axis splits."""

    flops_per_element = 5.0
