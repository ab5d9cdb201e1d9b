"""Exact runs: within machinery.exact.gradients_added_in_pairs, a tape adds gradients two at
a time (the same in either order), with the same values; and the train step, traced as the
loop runs it, holds no larger sum."""

from __future__ import annotations

import functools

from machinery import exact, steps

import numpy as np
import pytest
import tensorflow as tf

import network
import train


def sum_sizes(graph_def: tf.compat.v1.GraphDef) -> list[int]:
    """The number of inputs of each AddN, in the graph and the functions it calls."""
    nodes = [*graph_def.node,
             *(node for function in graph_def.library.function for node in function.node_def)]
    return [sum(not name.startswith("^") for name in node.input) for node in nodes if node.op == "AddN"]


def gradients_of_a_tensor_used_five_times(pairs: bool):
    x = tf.Variable([1.0, 2.0])

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            y = tf.sin(x) + tf.cos(x) + x * x + tf.exp(x)  # five uses of x: x * x has two
        return tape.gradient(y, x)

    if pairs:
        with exact.gradients_added_in_pairs():
            concrete = gradient.get_concrete_function()
    else:
        concrete = gradient.get_concrete_function()
    return concrete, concrete.graph.as_graph_def()


def test_a_tape_adds_gradients_in_pairs_within_the_context_and_not_after():
    default, default_graph = gradients_of_a_tensor_used_five_times(pairs=False)
    paired, paired_graph = gradients_of_a_tensor_used_five_times(pairs=True)
    assert sum_sizes(default_graph) == [5]  # TensorFlow's own: one AddN of five
    assert sum_sizes(paired_graph) == [2, 2, 2, 2]
    np.testing.assert_allclose(paired(), default(), rtol=1e-6)
    _, after = gradients_of_a_tensor_used_five_times(pairs=False)
    assert sum_sizes(after) == [5]  # the tape's own sums are back


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kl", network.KL_ESTIMATORS)
def test_the_loops_train_step_adds_gradients_two_at_a_time(precision, kl, shards):
    model = network.CVAE(2, precision)
    compiled_step = steps.CompiledStep(functools.partial(train.train_step, kl=kl), model,
                                       tf.keras.optimizers.Adam(1e-4), tf.random.Generator.from_seed(0),
                                       shards=shards)
    graph = compiled_step._steps.get_concrete_function(
        tf.TensorSpec((1, 4, 28, 28, 1)), tf.TensorSpec((), tf.int32)).graph.as_graph_def()
    sizes = sum_sizes(graph)
    assert sizes and max(sizes) == 2, sizes
