"""Exponential moving average of parameters.

The EMA is a pytree with the same structure as the parameters; sampling uses it. With
`start_step`, the EMA copies the parameters until that step (as MicroDiT's configs intend). With
`warmup`, the decay at step t is min(decay, (1 + t) / (10 + t)) (TensorFlow's ExponentialMovingAverage
with num_updates), so short runs are not dominated by the initial weights.
"""

import jax
import jax.numpy as jnp


def ema_update(ema, params, step, *, decay: float, start_step: int = 0, warmup: bool = False):
  """Returns decay * ema + (1 - decay) * params, or params itself before `start_step`.

  Args:
    ema: pytree of float arrays, the current average.
    params: pytree with the same structure, the new parameters.
    step: int32 scalar, the optimizer step that produced `params`.
    decay: EMA decay per step, in [0, 1).
    start_step: steps before which the EMA tracks the parameters exactly.
    warmup: use min(decay, (1 + t) / (10 + t)) with t = step - start_step.
  """
  d = jnp.asarray(decay, jnp.float32)
  if warmup:
    t = jnp.asarray(step - start_step, jnp.float32)
    d = jnp.minimum(d, (1.0 + t) / (10.0 + t))
  d = jnp.where(step < start_step, 0.0, d)

  def upd(e, p):
    return (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype)

  return jax.tree.map(upd, ema, params)
