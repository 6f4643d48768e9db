"""Exponential moving average of parameters.

The EMA is a pytree with the same structure as the parameters; sampling uses it. With
`start_step`, the EMA copies the parameters until that step (as MicroDiT's configs intend).
"""

import jax
import jax.numpy as jnp


def ema_update(ema, params, step, *, decay: float, start_step: int = 0):
  """Returns decay * ema + (1 - decay) * params, or params itself before `start_step`.

  Args:
    ema: pytree of float arrays, the current average.
    params: pytree with the same structure, the new parameters.
    step: int32 scalar, the optimizer step that produced `params`.
    decay: EMA decay per step, in [0, 1).
    start_step: steps before which the EMA tracks the parameters exactly.
  """
  d = jnp.where(step < start_step, 0.0, decay)

  def upd(e, p):
    return (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype)

  return jax.tree.map(upd, ema, params)
