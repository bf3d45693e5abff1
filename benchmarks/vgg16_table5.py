"""VGG-16 on 4 P100s: the plan keras_lwp picks beside the paper's Table 5.

    python -m benchmarks.vgg16_table5

Uses the paper's whole configuration space (space="full": convolutions split by channel and rows
too), 32 images per GPU at 224x224, on a 2x2 mesh (two axes, so a layer can split two dimensions)
and, as auto does, on the flattened 4-device mesh; prints both plans and the baselines' costs.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_lwp
    from examples import zoo

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "paper_results.json")) as f:
        paper = json.load(f)["table5_vgg16_plan_4gpus"] if os.path.exists(f.name) else None
    model = zoo.build("vgg16")
    batch = 4 * 32
    auto = keras_lwp.search(model, {"x": 2, "y": 2}, batch, profile="p100", space="full")
    on_grid = keras_lwp.search(model, {"x": 2, "y": 2}, batch, profile="p100", space="full",
                               overrides={"block1_conv1": {"sample": "x", "height": "y"}})
    print(auto.summary())
    print()
    print("The best plan that keeps the 2x2 mesh (block1_conv1 pinned to {n=x, h=y}):")
    print(on_grid.summary())
    print()
    for name in ("data", "model", "owt"):
        other = keras_lwp.search(model, {"x": 2, "y": 2}, batch, profile="p100", strategy=name, space="full")
        print(f"{name:>5}: {other.cost}   auto is {other.cost.total / auto.cost.total:.2f}x faster")
    print()
    print("Jia et al. 2018, Table 5 (VGG-16, 4 GPUs):")
    for group, config in (paper or {}).items():
        print(f"  {group:<28} {config}")


if __name__ == "__main__":
    main()
