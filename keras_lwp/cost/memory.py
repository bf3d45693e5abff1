"""Per-device memory of a layer under a configuration: what one device holds during a training step.

    weights      the layer's weight shards (trainable and not)
    gradients    one gradient per trainable weight shard
    optimizer    the optimizer's slots per trainable weight shard (Adam keeps two: m and v)
    activations  the output shards kept for the backward pass

Memory depends on the layout only, not on how fast anything runs, so every cost model shares this.
Transient buffers (a relayout's all-gather, a halo) live for one op and are left out; the estimate is
the state a step keeps alive, summed over the layers.
"""

from dataclasses import dataclass

# Adam, the most common optimizer with the most state: m and v per weight.
OPTIMIZER_SLOTS = 2


@dataclass(frozen=True)
class Memory:
    """Bytes on one device, by kind."""

    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self):
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def persistent(self):
        """What lives between steps as variables: weights and optimizer slots."""
        return self.weights + self.optimizer

    def __add__(self, other):
        return Memory(self.weights + other.weights, self.gradients + other.gradients,
                      self.optimizer + other.optimizer, self.activations + other.activations)

    def __str__(self):
        return (f"{self.total / 2**20:.2f} MiB (weights {self.weights / 2**20:.2f}, gradients "
                f"{self.gradients / 2**20:.2f}, optimizer {self.optimizer / 2**20:.2f}, activations "
                f"{self.activations / 2**20:.2f})")


def layer_memory(place, mesh, optimizer_slots=OPTIMIZER_SLOTS):
    """Memory of one device for the layer a Placement places (keras_lwp.layers.Placement)."""
    weights = trainable = 0.0
    for index, weight in enumerate(place.info.weights):
        shard = weight.nbytes / mesh.parts(place.weight_layout(index))
        weights += shard
        if weight.trainable:
            trainable += shard
    activations = sum(t.nbytes / mesh.parts(place.output_layout(t))
                      for call in place.info.calls for t in call.outputs)
    return Memory(weights, trainable, optimizer_slots * trainable, activations)
