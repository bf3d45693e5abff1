"""keras_lwp: layer-wise parallelism for Keras 3 on TensorFlow DTensor.

Every layer gets its own parallelization configuration (which mesh axis splits its sample, channel,
height, width or length dimension), chosen by an exact search over a cost model (Jia et al.,
"Exploring Hidden Dimensions in Parallelizing Convolutional Neural Networks", ICML 2018).

```python
import keras_lwp
keras_lwp.use_virtual_devices(8)
mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
plan = keras_lwp.search(model, mesh, batch_size=64)
print(plan.summary())
```
"""

from keras_lwp import cost, layers, layout_search, multihost
from keras_lwp.config import Config
from keras_lwp.cost.cache import clear_cache
from keras_lwp.mesh import MeshSpec, make_mesh, use_virtual_devices
from keras_lwp.multihost import ClientFailedError, ClientMismatchError, initialize
from keras_lwp.planner import MemoryLimitError, search
from keras_lwp.plot import plot_strategy
from keras_lwp.runtime import parallelize, strategy_of
from keras_lwp.strategy import Strategy, StrategyCost

__version__ = "0.1.0"


def __getattr__(name):
    # keras_lwp.callbacks imports Keras (and so TensorFlow): loaded on first use, so that the search,
    # the rules and the cost arithmetic import without TensorFlow (tests/pure/test_imports.py).
    if name == "callbacks":
        import importlib

        return importlib.import_module("keras_lwp.callbacks")
    raise AttributeError(f"module 'keras_lwp' has no attribute {name!r}")


__all__ = [
    "ClientFailedError", "ClientMismatchError", "Config", "MemoryLimitError", "MeshSpec", "Strategy", "StrategyCost",
    "callbacks", "clear_cache", "cost", "initialize", "layers", "layout_search", "make_mesh", "multihost", "parallelize",
    "plot_strategy", "search", "strategy_of", "use_virtual_devices",
]
