"""Cost model: device profiles, communication, and per-layer / per-edge costs.

The analytic model and the arithmetic import no TensorFlow; `ProfiledCostModel` measures on the
mesh (TensorFlow is imported when it first measures).
"""

from keras_lwp.cost.cache import cache_dir, clear_cache
from keras_lwp.cost.collectives import CollectiveModel, LinearFit
from keras_lwp.cost.comm import allreduce_time, received_fraction, relayout_bytes, relayout_time
from keras_lwp.cost.devices import PROFILES, DeviceProfile, Link, get_profile
from keras_lwp.cost.model import COST_MODELS, AnalyticCostModel, CostModel, LayerCost, make_cost_model
from keras_lwp.cost.profiled import ProfiledCostModel

__all__ = [
    "COST_MODELS", "PROFILES", "AnalyticCostModel", "CollectiveModel", "CostModel", "DeviceProfile", "LayerCost",
    "LinearFit", "Link", "ProfiledCostModel", "allreduce_time", "cache_dir", "clear_cache", "get_profile",
    "make_cost_model", "received_fraction", "relayout_bytes", "relayout_time",
]
