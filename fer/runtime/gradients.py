"""The one place with backend-specific code: gradients of class scores w.r.t. an inner activation.

Keras 3 has no backend-neutral "gradient of this w.r.t. that", so Grad-CAM needs a few lines per
backend. Everything else (`fer.explain.gradcam`) is written with NumPy and `keras.ops`. The returned
function is compiled (`tf.function` / `jax.jit`): eager Grad-CAM is many times slower
(docs/pitfalls.md#flat-backbone).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from fer.core.errors import UserError

# fn(activations float32 (N,h,w,c), class_ids int32 (N,); -1 = the predicted class)
#   -> (gradients (N,h,w,c), logits (N,K))
GradFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def class_score_gradients(head_logits: Callable) -> GradFn:
    """Compile d logit[class_i] / d activation_i for `head_logits`, a function activations ->
    logits.

    Images in a batch are independent (inference mode), so the gradient of the summed chosen logits
    gives every image its own gradient in one pass.
    """
    backend = keras.backend.backend()

    def total_score(activations, class_ids):
        logits = head_logits(activations)
        predicted = keras.ops.cast(keras.ops.argmax(logits, axis=-1), "int32")
        class_ids = keras.ops.where(class_ids < 0, predicted, class_ids)
        chosen = keras.ops.take_along_axis(logits, keras.ops.expand_dims(class_ids, -1), axis=-1)
        return keras.ops.sum(chosen), logits

    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def grads_tf(activations, class_ids):
            with tf.GradientTape() as tape:
                tape.watch(activations)
                score, logits = total_score(activations, class_ids)
            return tape.gradient(score, activations), logits

        def run(activations, class_ids):
            grads, logits = grads_tf(
                tf.constant(activations, tf.float32), tf.constant(class_ids, tf.int32)
            )
            return grads.numpy(), logits.numpy()

        return run
    if backend == "jax":
        import jax

        grads_jax = jax.jit(jax.grad(total_score, argnums=0, has_aux=True))

        def run(activations, class_ids):
            grads, logits = grads_jax(
                np.asarray(activations, np.float32), np.asarray(class_ids, np.int32)
            )
            return np.asarray(grads), np.asarray(logits)

        return run
    raise UserError(f"Grad-CAM supports the tensorflow and jax Keras backends, not '{backend}'")
