"""Hidden dimensions of Embedding: the table split by columns (channel) or by rows (vocabulary).

    y[n, l, :] = table[ids[n, l], :]

- channel: the table split by columns, the output along its last axis. DTensor's own gather runs it
  (each device looks its columns up, nothing moves forward; the table's gradient is synchronized
  over the axes that split the ids, like any weight): exact, so `runs=DTENSOR`, no implementation.
- vocabulary: the table split by rows, P blocks of V/P rows on a mesh axis. `hidden_embedding` views
  the table as [P, V/P, D] (block axis on the mesh axis) and the ids as [P, N, L] (a broadcast, laid
  out on it too); block p looks up the ids it owns (id - p V/P in [0, V/P)), zeros elsewhere, and the
  blocks are summed: a partial sum over the vocabulary axis, which DTensor all-reduces (the DimSpec's
  output=None, so the cost model prices that all-reduce).
  The table's gradient is what single-device TensorFlow gives: an IndexedSlices, one row of dy per
  id, not a dense table. Keras' TF optimizers act on that form itself: Adam squares its rows before
  the duplicate ids are summed (sum of squares, where a dense gradient would give the square of the
  sum), so a dense gradient, exact as it is, trained ~1e-3 away from one device under Adam. The
  optimizer densifies the IndexedSlices into the whole table and DTensor all-reduces that over the
  axes that split the ids: the synchronization carries the whole table, not its row block (the
  DimSpec says so with `whole_gradient`, and the cost model prices it). What the split saves is
  memory (table and optimizer slots by rows) and the lookup; plain SGD fails on it as on every
  Embedding split (ResourceScatterSub has no DTensor layout rule, docs/design.md).

Negative ids count from the end, as keras.ops.take does; an id past the table gives zeros (the
single-device layer raises). Tested exactly (forward and table gradient) in
tests/test_hidden_embedding.py. A LoRA-enabled or quantized Embedding keeps the builtin space.
"""

import dataclasses

import numpy as np

from keras_lwp.layers import halo
from keras_lwp.layers.base import DTENSOR, KERAS_LWP, no_extra_arguments, register_rule, unsupported_split
from keras_lwp.layers.builtin import EmbeddingRule


def _plain(info):
    """A float Embedding with one weight (no LoRA, no quantization): what this rule computes."""
    return len(info.weights) == 1 and not info.config.get("lora_rank") and not info.config.get("quantization_config")


@register_rule("Embedding")
class HiddenEmbeddingRule(EmbeddingRule):
    """Embedding with its channel split run by DTensor and its vocabulary split by keras_lwp."""

    def dimensions(self, info):
        dims = super().dimensions(info)
        if not _plain(info):
            return dims
        result = []
        for d in dims:
            if d.name == "channel":
                d = dataclasses.replace(d, runs=DTENSOR)
            elif d.name == "vocabulary":
                d = dataclasses.replace(d, runs=KERAS_LWP, whole_gradient=True)
            result.append(d)
        return result

    def implementation(self, info, config):
        if "vocabulary" not in config:
            return None  # sample, length, channel: DTensor's gather
        if not _plain(info):
            raise unsupported_split(info, ["vocabulary"], "with LoRA or quantization",
                                    "that split for a plain float table")
        return hidden_embedding


def hidden_embedding(layer, place, mesh, inputs, *args, **kwargs):
    """Embedding under a configuration with a vocabulary split (see the module doc)."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    no_extra_arguments(layer, args, kwargs)
    config = place.config
    ids = inputs
    if ids.dtype not in (tf.int32, tf.int64):
        ids = tf.cast(ids, tf.int32)
    rank = len(ids.shape)
    variable = layer._embeddings.value  # the DVariable itself: its gradient is built below
    vocabulary, width = variable.shape
    vocab_axis = config["vocabulary"]
    parts = halo.axis_size(mesh, vocab_axis)
    rows = vocabulary // parts
    channel_axis = config.get("channel")
    ids_spec = [halo.fits(a, s, mesh) for a, s in zip(place.input_layout(0, ids), ids.shape)]
    ids = halo.relayout(ids, ids_spec, mesh)
    ids = tf.where(ids < 0, ids + tf.cast(vocabulary, ids.dtype), ids)

    # Each table block's ids, relative to its first row: [P, N, (L)], the block axis on the mesh axis.
    first = np.arange(parts).reshape([parts] + [1] * rank) * rows
    first = dtensor.copy_to_mesh(tf.constant(first, dtype=ids.dtype), dtensor.Layout.replicated(mesh, rank + 1))
    first = halo.relayout(first, [vocab_axis] + [None] * rank, mesh)
    local = halo.relayout(tf.expand_dims(ids, 0) - first, [vocab_axis] + ids_spec, mesh)
    owned = tf.logical_and(local >= 0, local < rows)
    local = tf.where(owned, local, tf.zeros_like(local))

    @tf.custom_gradient
    def lookup(local):
        blocks = tf.reshape(tf.convert_to_tensor(variable), [parts, rows, width])
        blocks = halo.relayout(blocks, [vocab_axis, None, channel_axis], mesh)
        found = tf.gather(blocks, local, axis=1, batch_dims=1)  # [P, N, (L,) D]
        found = found * tf.expand_dims(tf.cast(owned, found.dtype), -1)
        found = halo.relayout(found, [vocab_axis] + ids_spec + [channel_axis], mesh)
        summed = tf.reduce_sum(found, axis=0)  # the partial sum over the vocabulary axis: all-reduced

        def gradient(upstream, variables=None):
            # The table's gradient as single-device TensorFlow gives it: one row per id (see the module doc).
            upstream = halo.relayout(upstream, ids_spec + [channel_axis], mesh)
            values = tf.reshape(upstream, [-1, width])
            dense_shape = tf.constant([vocabulary, width], dtype=tf.int64)
            return None, [tf.IndexedSlices(values, tf.reshape(ids, [-1]), dense_shape)]

        return summed, gradient

    y = halo.relayout(lookup(local), ids_spec + [channel_axis], mesh)
    return tf.cast(y, layer.compute_dtype)


__all__ = ["HiddenEmbeddingRule", "hidden_embedding"]
