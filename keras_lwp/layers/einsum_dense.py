"""EinsumDense: the column- and row-parallel splits Dense has, read off its equation.

The equation's letters say which dimension ties to which axes, as in `keras_lwp.layers.base`:

    "abc,cde->abde"   input a b c   kernel c d e   output a b d e   bias (bias_axes) ... d e
    sample     a: the batch, first letter of input and output, not in the kernel
    length     b: the one other letter of input and output not in the kernel (a sequence axis)
    channel    d: the first kernel letter of the output not in the input (column-parallel: kernel
                  and bias split along it, the output too; the input gradient is a partial sum)
    reduction  c: the first letter of input and kernel not in the output (row-parallel: kernel rows
                  and the input split along it; the output is a partial sum, all-reduced before the
                  bias and activation)

DTensor runs every one of these with its own einsum, forward and backward, exactly
(tests/test_einsum_dense.py), moving what the cost model prices (benchmarks/bench_moves.py): so they
run on DTensor (`runs=DTENSOR`), with no implementation. The channel is the first (outermost) such letter because
keras.ops.einsum runs "abc,cde->abde" as a matmul with the kernel reshaped to [c, d*e], which keeps a
split of d local (one of e would be gathered). Equations with an ellipsis, and LoRA or quantized
layers, keep the builtin sample-only space.
"""

import re

from keras_lwp.layers.base import DimSpec, register_rule
from keras_lwp.layers.builtin import EinsumDenseRule

_EQUATION = re.compile(r"^([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)$")


def _letters(info):
    """(input, kernel, output, bias) letters of the layer's equation, or None when it has an ellipsis."""
    match = _EQUATION.match(str(info.config.get("equation", "")).replace(" ", ""))
    if not match:
        return None
    inputs, kernel, output = match.groups()
    bias_axes = info.config.get("bias_axes") or ""
    bias = output[min(output.find(c) for c in bias_axes):] if bias_axes else ""
    return inputs, kernel, output, bias, bias_axes


@register_rule("EinsumDense")
class SplitEinsumDenseRule(EinsumDenseRule):
    """EinsumDense with sample, length, channel (column-parallel) and reduction (row-parallel) splits."""

    def dimensions(self, info):
        letters = _letters(info)
        if letters is None or info.config.get("lora_rank") or info.config.get("quantization_config"):
            return super().dimensions(info)
        inputs, kernel, output, bias, bias_axes = letters
        x, y = info.inputs[0], info.output

        def weights(letter, in_bias):
            axes = []
            for weight in info.weights:
                name = weight.name.split("/")[-1]
                if name == "kernel" and letter is not None:
                    axes.append(kernel.index(letter) if letter in kernel else None)
                elif name == "bias" and in_bias and letter in bias_axes:
                    axes.append(bias.index(letter))
                else:
                    axes.append(None)
            return tuple(axes)

        dims = []
        free = [c for c in inputs if c in output and c not in kernel]
        if free and free[0] == inputs[0] == output[0]:
            dims.append(DimSpec(name="sample", size=y.shape[0], output=0, inputs=(0,), weights=weights(None, False)))
            if len(free) == 2:
                c = free[1]
                dims.append(DimSpec(name="length", size=y.shape[output.index(c)], output=output.index(c),
                                    inputs=(inputs.index(c),),
                                    weights=weights(None, False)))
        columns = [c for c in kernel if c in output and c not in inputs]
        if columns:
            c = columns[0]
            dims.append(DimSpec(name="channel", size=y.shape[output.index(c)], output=output.index(c), inputs=(None,),
                                weights=weights(c, True)))
        rows = [c for c in kernel if c in inputs and c not in output]
        if rows:
            c = rows[0]
            dims.append(DimSpec(name="reduction", size=x.shape[inputs.index(c)], output=None,
                                inputs=(inputs.index(c),), weights=weights(c, False)))
        return dims if dims and dims[0].name == "sample" else super().dimensions(info)


__all__ = ["SplitEinsumDenseRule"]
