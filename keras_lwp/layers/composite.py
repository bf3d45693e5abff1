"""Layers made of layers: a transformer block, a patch embedding, a whole encoder (keras_hub's
TransformerEncoder, TransformerDecoder, LlamaTransformerDecoder, ViTEncoder, ...).

A layer with no rule of its own that is made of sub-layers is planned as one node and run by its own
`call` on the mesh; DTensor shards what its sub-layers compute from the layouts of the layer's inputs
and weights, so every split below computes what one device computes (the per-layer numerics test
checks them like any rule). Two dimensions:
- sample: every batch-major input and output split along the batch, the weights whole (their
  gradients all-reduced);
- heads (Megatron-style, when the layer holds an attention's query/key/value/output kernels): the
  attention's heads and the feed-forward's hidden units split across devices: query/key/value kernels
  (and biases) by heads, the attention output kernel by its heads (a row-parallel product, all-reduced
  by DTensor), the feed-forward's intermediate and gate kernels by columns, its output kernel by rows.
  The block's input and output stay whole along the split: the output is a partial sum (all-reduced),
  as is the input's gradient: one all-reduce each way per row-parallel product (two for a block
  with attention and a feed-forward, `DimSpec.partial_sums`).
Any weight the names below do not place stays whole; DTensor still computes it exactly.
"""

import math

from keras_lwp.layers.base import DimSpec, LayerRule, set_composite_rule

# (suffix of a weight's path, rank) -> the weight axis the heads dimension splits.
HEADS_AXES = {
    ("query/kernel", 3): 1, ("key/kernel", 3): 1, ("value/kernel", 3): 1,
    ("query/bias", 2): 0, ("key/bias", 2): 0, ("value/bias", 2): 0,
    ("attention_output/kernel", 3): 0,
    ("intermediate_dense/kernel", 2): 1, ("intermediate_dense/bias", 1): 0,
    ("gate_dense/kernel", 2): 1, ("gate_dense/bias", 1): 0,
    ("output_dense/kernel", 2): 0,
}


def heads_axis(weight):
    for (suffix, rank), axis in HEADS_AXES.items():
        if weight.name.endswith(suffix) and len(weight.shape) == rank:
            return axis
    return None


class CompositeRule(LayerRule):
    """A layer made of layers, run by its own call: sample and (attention blocks) heads splits."""

    def dimensions(self, info):
        y = info.output
        if not y.shape:
            return []
        batch = y.shape[0]
        if any(not t.shape or t.shape[0] != batch for call in info.calls for t in call.outputs):
            return []  # an output that is not batch-major: nothing is known to split
        inputs = tuple(0 if t.shape and t.shape[0] == batch else None for t in info.inputs)
        dims = []
        if not info.keeps_batch_whole:  # a call that rolls, maps or scans along the batch stays whole along it
            dims.append(DimSpec(name="sample", size=batch, output=0, inputs=inputs,
                                weights=tuple(None for _ in info.weights)))
        axes = tuple(heads_axis(w) for w in info.weights)
        placed = [w.shape[a] for w, a in zip(info.weights, axes) if a is not None]
        attention = any(w.name.endswith("attention_output/kernel") for w in info.weights)
        if attention and placed:
            # One all-reduce per row-parallel product (each attention's output, each feed-forward's).
            row_parallel = sum(1 for w, a in zip(info.weights, axes) if a == 0 and w.name.endswith("/kernel"))
            dims.append(DimSpec(name="heads", size=math.gcd(*placed), output=None,
                                inputs=tuple(None for _ in info.inputs), weights=axes,
                                partial_sums=max(1, row_parallel)))
        return dims

    def forward_flops(self, info, call):
        """Every weight matrix applied at every position (2 flops a multiply-add), and attention's
        scores and weighted sum (4 B L^2 D) for a block that holds one."""
        y = call.outputs[0]
        positions = math.prod(y.shape[:-1]) if len(y.shape) > 1 else (y.shape[0] if y.shape else 1)
        matrices = sum(math.prod(w.shape) for w in info.weights if len(w.shape) >= 2)
        flops = 2.0 * positions * matrices
        if any(w.name.endswith("attention_output/kernel") for w in info.weights) and len(y.shape) == 3:
            flops += 4.0 * y.shape[0] * y.shape[1] ** 2 * y.shape[2]
        return flops


set_composite_rule(CompositeRule())
