"""Per-layer-type parallelization rules, registered in one place (see `base` and `builtin`)."""

from keras_lwp.layers import builtin  # noqa: F401  (registers the built-in rules)
from keras_lwp.layers import hidden  # noqa: F401  (Conv1D/Conv2D channel and spatial splits DTensor refuses)
from keras_lwp.layers import hidden_pooling  # noqa: F401  (pooling's spatial, channel and average-sample splits)
from keras_lwp.layers import hidden_embedding  # noqa: F401  (Embedding's channel and vocabulary splits)
from keras_lwp.layers import einsum_dense  # noqa: F401  (EinsumDense's column- and row-parallel splits)
from keras_lwp.layers import hidden_depthwise  # noqa: F401  (DepthwiseConv's sample, channel, spatial splits)
from keras_lwp.layers import recurrent  # noqa: F401  (RNNs: sample split, run unrolled)
from keras_lwp.layers import composite  # noqa: F401  (layers made of layers: sample and attention-heads splits)
from keras_lwp.layers import hub  # noqa: F401  (keras_hub's embeddings and norms, by class name)
from keras_lwp.layers.base import (
    COSTED,
    DTENSOR,
    KERAS_LWP,
    DimSpec,
    LayerRule,
    Placement,
    UnknownLayerWarning,
    check_dims,
    configurations,
    dimensions_of,
    has_rule,
    has_rule_for,
    is_composite,
    register_rule,
    registered_rule,
    rule_for,
    runnable_dims,
)

__all__ = [
    "COSTED", "DTENSOR", "KERAS_LWP", "DimSpec", "LayerRule", "Placement", "UnknownLayerWarning", "check_dims", "configurations", "dimensions_of",
    "has_rule", "has_rule_for", "is_composite", "register_rule", "registered_rule", "rule_for", "runnable_dims",
]
