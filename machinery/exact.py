"""Gradients added two at a time, so that a seed repeats a run bit for bit.

Where a tensor feeds several ops, tf.GradientTape adds their gradients in one AddN, and
TensorFlow's CPU AddN starts its sum from whichever input buffer it may reuse, which
depends on timing when ops run side by side: with three inputs or more, the rounding
then differs from run to run. A sum of two is the same in either order. Within
`gradients_added_in_pairs()`, a tape adds its gradients as a chain of sums of two (what
tf.gradients calls AggregationMethod.EXPERIMENTAL_TREE), whatever loss it differentiates,
in the order the tape found them: the same order for the same traced code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import tensorflow as tf

# The tape's vector space: TensorFlow's own, of which only the sum is replaced. TensorFlow
# has no public switch for how a tape adds gradients, so this reaches into its eager
# backprop module; tests/test_exact.py checks on every TensorFlow that CI installs.
from tensorflow.python import pywrap_tfe
from tensorflow.python.eager import backprop


def _add_in_pairs(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """((g0 + g1) + g2) + ...: sums of two, in the order the tape found the gradients."""
    if len(gradients) < 3 or not all(isinstance(gradient, tf.Tensor) for gradient in gradients):
        return backprop._aggregate_grads(gradients)  # one or two, or IndexedSlices
    total = gradients[0]
    for gradient in gradients[1:]:
        total = tf.math.add_n([total, gradient])
    return total


@contextlib.contextmanager
def gradients_added_in_pairs() -> Iterator[None]:
    """Within it (while a tf.function traces, or eagerly), every tf.GradientTape adds
    the gradients of a tensor two at a time. Not to be nested: it puts TensorFlow's own
    sums back on leaving."""
    default = backprop._default_vspace
    pywrap_tfe.TFE_Py_RegisterVSpace(default._replace(aggregate_fn=_add_in_pairs))
    try:
        yield
    finally:
        pywrap_tfe.TFE_Py_RegisterVSpace(default)
