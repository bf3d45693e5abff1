"""Cost model: device profiles, communication, and per-layer / per-edge costs (no TensorFlow)."""

from keras_lwp.cost.comm import allreduce_time, received_fraction, relayout_bytes, relayout_time
from keras_lwp.cost.devices import PROFILES, DeviceProfile, Link, get_profile
from keras_lwp.cost.model import AnalyticCostModel, CostModel, LayerCost

__all__ = [
    "PROFILES", "AnalyticCostModel", "CostModel", "DeviceProfile", "LayerCost", "Link",
    "allreduce_time", "get_profile", "received_fraction", "relayout_bytes", "relayout_time",
]
