"""`common.nn.transformer.attention`: XLA's attention whose backward pass recomputes the logits
and probabilities instead of keeping them (values and gradients unchanged, memory of a flash
attention)."""

import jax
import jax.numpy as jnp
import numpy as np

from common.nn import transformer
from common.training.memory import temporaries_mib


def _xla(q, k, v, mask=None):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def test_values_and_gradients_equal_xla_attention():
  kq, kk, kv, km, kg = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(kq, (2, 7, 3, 8))
  k = jax.random.normal(kk, (2, 5, 3, 8))
  v = jax.random.normal(kv, (2, 5, 3, 8))
  g = jax.random.normal(kg, (2, 7, 3, 8))
  mask = jax.random.bernoulli(km, 0.7, (2, 1, 1, 5)).at[:, :, :, 0].set(True)
  for m in (None, mask):
    want, want_vjp = jax.vjp(lambda q, k, v, m=m: _xla(q, k, v, m), q, k, v)
    got, got_vjp = jax.vjp(lambda q, k, v, m=m: transformer.attention(q, k, v, m), q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_vjp(g), want_vjp(g)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert not np.allclose(transformer.attention(q, k, v, mask), transformer.attention(q, k, v))


def _grad_temporaries(attend, layers_: int) -> float:
  """Compiled temporaries (MiB) of the gradient of `layers_` chained self-attentions x <- x +
  attend(x, x, x) on x [4, 256, 8, 32] bf16, whose logits and probabilities are float32
  [4, 8, 256, 256] (8 MiB each)."""
  def loss(x):
    for i in range(layers_):
      x = x + attend(x * (i + 1), x, x)
    return jnp.sum(x.astype(jnp.float32))
  x = jax.ShapeDtypeStruct((4, 256, 8, 32), jnp.bfloat16)
  return temporaries_mib(jax.grad(loss), x)


def test_the_backward_pass_keeps_no_attention_probabilities():
  """Per layer, plain XLA attention keeps float32 [B, N, T, S] tensors for the backward pass;
  `attention` keeps only its bf16 inputs (0.5 MiB each here)."""
  per_layer = {name: (_grad_temporaries(fn, 8) - _grad_temporaries(fn, 4)) / 4
               for name, fn in (("plain", _xla), ("recomputed", transformer.attention))}
  assert per_layer["plain"] > 8 and per_layer["recomputed"] < 2, per_layer
