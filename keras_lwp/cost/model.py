"""The cost model: seconds per training step of a layer under a configuration, and of an edge.

    t_o(G, S) = sum_l (t_c(l, c_l) + t_s(l, c_l)) + sum_e t_x(e, c_u, c_v)

- `CostModel.layer_cost` gives t_c (forward + backward compute), t_s (gradient all-reduce over the
  mesh axes that split the work but not the weight, plus the optimizer update of the local shard)
  and the communication the configuration itself implies (partial-sum all-reduces of the output or
  the input gradient, halo exchange, normalization statistics), counted with transfer.
- `CostModel.transfer_cost` gives t_x: the relayout of an activation forward and of its gradient
  backward, from the bytes that move (keras_lwp.cost.comm).

- `CostModel.step_overhead` is what a training step costs besides its layers (the same for every
  strategy on the same devices; reported, not searched over).

`AnalyticCostModel` derives all of it from FLOPs and bytes against a DeviceProfile;
`keras_lwp.cost.ProfiledCostModel` measures it on the mesh. `make_cost_model` builds either by name.
"""

from dataclasses import dataclass

import numpy as np

from keras_lwp.cost.comm import ALL_GATHER_FACTOR, allreduce_time, relayout_coefficients, relayout_time
from keras_lwp.cost.devices import get_profile
from keras_lwp.cost import volume
from keras_lwp.cost.volume import is_float
from keras_lwp.cost.memory import layer_memory
from keras_lwp.layers.base import Placement

# Bytes an optimizer update reads and writes per weight byte (weight, gradient, two slots, in and out).
UPDATE_TRAFFIC = 7


@dataclass(frozen=True)
class LayerCost:
    """Seconds per training step of one layer under one configuration, and its memory on one device."""

    compute: float
    sync: float
    transfer: float
    memory: float

    @property
    def total(self):
        return self.compute + self.sync + self.transfer


class CostModel:
    """Interface of every cost model (analytic, profiled).

    Attributes:
        mesh: the MeshSpec the costs are for.
        name: a short name the Strategy reports ("profiled", a device profile's name).
    """

    name = None
    step_overhead = 0.0  # seconds per training step besides the layers

    def for_mesh(self, mesh):
        """The same kind of cost model for another mesh of the same devices (the planner also
        searches the flattened mesh), or None to leave that mesh to the analytic model."""
        return None

    def prepare(self, requests):
        """Called with every [(info, rule, dims, config)] a cost table is about to ask for: a model that
        measures can do it all at once here. Optional."""

    def layer_cost(self, info, rule, dims, config):
        """LayerCost of one layer (LayerInfo, its rule and DimSpecs) under a Config."""
        raise NotImplementedError

    def transfer_cost(self, tensor, src_layout, dst_layout):
        """Seconds to relayout a TensorInfo forward, and its gradient backward."""
        raise NotImplementedError

    def transfer_table(self, tensor, src_layouts, dst_layouts):
        """transfer_cost for every (src, dst) pair, as an array [len(src_layouts), len(dst_layouts)]."""
        return np.array([[self.transfer_cost(tensor, s, d) for d in dst_layouts] for s in src_layouts])


class AnalyticCostModel(CostModel):
    """t_c from FLOPs and bytes on a roofline, communication from bytes over the links of the mesh."""

    def __init__(self, mesh, profile=None):
        self.mesh = mesh
        self.profile = get_profile(profile, mesh)
        self._slowdown = self.profile.compute_slowdown(mesh)
        self._relayouts = {}

    def __repr__(self):
        return f"AnalyticCostModel({self.mesh}, profile={self.profile.name!r})"

    @property
    def name(self):
        return self.profile.name

    def for_mesh(self, mesh):
        return AnalyticCostModel(mesh, self.profile)

    def _roofline(self, flops, nbytes):
        p = self.profile
        return max(flops / p.effective_flops, nbytes / p.memory_bandwidth) * self._slowdown

    def layer_cost(self, info, rule, dims, config):
        place = Placement(info, dims, config, self.mesh)
        shards = place.shards()
        has_weights = any(place.trained)
        compute = transfer = 0.0
        for call in info.calls:
            flops = rule.forward_flops(info, call) / shards
            # Backward: input gradient (+ weight gradient when the layer has weights).
            flops *= 3.0 if has_weights else 2.0
            compute += self._roofline(flops, rule.memory_traffic(info, call, config) / shards)
            compute += rule.tap_passes(info, call, config) * self.profile.tap_seconds
            out = call.outputs[0]
            out_shard = out.nbytes / self.mesh.parts(place.output_layout(out))
            reductions = place.partial_sums()
            transfer += reductions * allreduce_time(out_shard, place.output_partial_axes(), self.mesh, self.profile)
            for index, tensor in enumerate(call.inputs):
                if is_float(tensor.dtype):
                    shard = tensor.nbytes / self.mesh.parts(place.input_layout(index, tensor))
                    transfer += reductions * allreduce_time(shard, place.input_grad_partial_axes(index), self.mesh,
                                                            self.profile)
            transfer += self._halo_time(place, call)
            transfer += self._stats_time(place, info)
        sync = 0.0
        # A layer's gradients that reduce over the same axes go in one fused all-reduce (as DTensor's
        # all-reduce combining does), so latency is paid once per group, not per weight.
        gradient_groups = {}
        for index, weight in enumerate(info.weights):
            shard = weight.nbytes / self.mesh.parts(place.weight_layout(index))
            if place.trained[index]:
                axes = place.weight_grad_partial_axes(index)
                gradient = weight.nbytes / self.mesh.parts(place.weight_grad_layout(index))
                gradient_groups[axes] = gradient_groups.get(axes, 0.0) + gradient
                sync += self._roofline(0.0, UPDATE_TRAFFIC * shard)
        for axes, nbytes in gradient_groups.items():
            sync += allreduce_time(nbytes, axes, self.mesh, self.profile)
        return LayerCost(compute, sync, transfer, layer_memory(place, self.mesh).total)

    def halo_bytes(self, place, call):
        """Bytes one device receives per pass for the halos of its spatial splits."""
        return volume.halo_bytes(place, call, self.mesh)

    def _halo_time(self, place, call):
        """The halo exchange forward (input rows) and backward (their gradient) with both neighbours."""
        axes = tuple(axis for _, axis in place.halo_splits())
        if not axes:
            return 0.0
        link = self.profile.link_for_axes(self.mesh, axes)
        # The edges travel by DTensor's all-gather: ALL_GATHER_FACTOR times the rows received.
        seconds = ALL_GATHER_FACTOR * self.halo_bytes(place, call) / link.bandwidth
        return 2 * (seconds + 2 * len(axes) * link.latency)

    def _stats_time(self, place, info):
        """BatchNormalization: all-reduce mean and variance (forward) and their gradients (backward)."""
        axes = place.stats_axes()
        if not axes:
            return 0.0
        channels = info.output.shape[-1] / self.mesh.parts(tuple(a for d, a in place.config.items() if d == "channel"))
        return 2 * allreduce_time(2 * 4 * channels, axes, self.mesh, self.profile)

    def _coefficients(self, src, dst):
        """(seconds per tensor byte, fixed seconds) of a relayout, cached per model: the key is two
        small tuples, cheaper to hash than the (mesh, profile) a global cache would need."""
        key = (src, dst)
        found = self._relayouts.get(key)
        if found is None:
            found = self._relayouts[key] = relayout_coefficients(src, dst, self.mesh, self.profile)
        return found

    def transfer_table(self, tensor, src_layouts, dst_layouts):
        forward = np.array([[self._coefficients(s, d) for d in dst_layouts] for s in src_layouts])
        forward = forward.reshape(len(src_layouts), len(dst_layouts), 2)
        table = forward[..., 0] * tensor.nbytes + forward[..., 1]
        if is_float(tensor.dtype):  # the gradient travels back
            back = np.array([[self._coefficients(d, s) for d in dst_layouts] for s in src_layouts])
            back = back.reshape(len(src_layouts), len(dst_layouts), 2)
            table += back[..., 0] * tensor.nbytes + back[..., 1]
        return table

    def transfer_cost(self, tensor, src_layout, dst_layout):
        seconds = relayout_time(tensor.nbytes, src_layout, dst_layout, self.mesh, self.profile)
        if is_float(tensor.dtype):  # the gradient travels back
            seconds += relayout_time(tensor.nbytes, dst_layout, src_layout, self.mesh, self.profile)
        return seconds


COST_MODELS = ("analytic", "profiled")


def make_cost_model(kind, mesh, profile=None, optimizer=None):
    """A cost model by name for `mesh` (a MeshSpec): "analytic" (from `profile`) or "profiled"
    (measured on this process's devices; `optimizer` is the one whose update it times)."""
    if kind == "analytic":
        return AnalyticCostModel(mesh, profile)
    if kind == "profiled":
        from keras_lwp.cost.profiled import ProfiledCostModel

        return ProfiledCostModel(mesh, optimizer=optimizer)
    raise ValueError(
        f"cost_model must be one of {', '.join(repr(k) for k in COST_MODELS)} or a keras_lwp.cost.CostModel. "
        f"Received: cost_model={kind!r}"
    )
