"""A small CNN that labels 28x28 Fashion-MNIST images: the judge of the text-to-image demos.

Two conv layers (3x3, 32 and 64 channels, each followed by ReLU and 2x2 max-pooling), a 128-unit
hidden layer and 10 logits; AdamW, 4 epochs over the 60000 training images, batch 256. It reaches
about 91% on the real test images (printed by the benchmarks that use it, beside their figures).

Trained parameters are cached in an .npz (the benchmarks keep one per workdir), so scoring a second
set of samples does not train again.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.data import sources


def _init(key: jax.Array) -> dict[str, jax.Array]:
  k = jax.random.split(key, 4)
  he = lambda kk, shape, fan_in: jax.random.normal(kk, shape) * np.sqrt(2.0 / fan_in)
  return {"c1": he(k[0], (3, 3, 1, 32), 9), "b1": jnp.zeros(32),
          "c2": he(k[1], (3, 3, 32, 64), 9 * 32), "b2": jnp.zeros(64),
          "d1": he(k[2], (7 * 7 * 64, 128), 7 * 7 * 64), "b3": jnp.zeros(128),
          "d2": he(k[3], (128, 10), 128), "b4": jnp.zeros(10)}


def _pool(x: jax.Array) -> jax.Array:
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def logits(params: dict[str, jax.Array], images: jax.Array) -> jax.Array:
  """images: uint8 or float [N, 28, 28(, 1)] in [0, 255] -> logits float32 [N, 10]."""
  x = jnp.asarray(images, jnp.float32).reshape(-1, 28, 28, 1) / 127.5 - 1.0
  for w, b in (("c1", "b1"), ("c2", "b2")):
    x = jax.lax.conv_general_dilated(x, params[w], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = _pool(jax.nn.relu(x + params[b]))
  x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["d1"] + params["b3"])
  return x @ params["d2"] + params["b4"]


def train(images: np.ndarray, labels: np.ndarray, *, epochs: int = 4, batch: int = 256,
          seed: int = 0) -> dict[str, jax.Array]:
  """Trains the CNN on uint8 images [N, 28, 28(, 1)] with int labels [N]."""
  tx = optax.adamw(optax.cosine_decay_schedule(2e-3, epochs * (len(images) // batch)),
                   weight_decay=1e-4)
  params = _init(jax.random.key(seed))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for i in range(len(images) // batch):
      idx = order[i * batch:(i + 1) * batch]
      params, opt = step(params, opt, images[idx], labels[idx])
  return params


def predict(params: dict[str, jax.Array], images: np.ndarray, batch: int = 1000) -> np.ndarray:
  """Class indices int64 [N] of images [N, 28, 28(, 1)] in [0, 255]."""
  f = jax.jit(logits)
  out = [np.asarray(jnp.argmax(f(params, images[i:i + batch]), -1))
         for i in range(0, len(images), batch)]
  return np.concatenate(out).astype(np.int64)


def load_or_train(cache: str, fmnist_dir: str = sources.FASHION_MNIST_DEFAULT_DIR):
  """(params, accuracy on the real test images): from `cache` if it exists, else trained on the
  training split and saved there."""
  te_x, te_y = sources.load_fashion_mnist(fmnist_dir, "test")
  if os.path.exists(cache):
    with np.load(cache) as f:
      params = {k: jnp.asarray(f[k]) for k in f.files}
  else:
    tr_x, tr_y = sources.load_fashion_mnist(fmnist_dir, "train")
    params = train(tr_x, tr_y)
    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    np.savez(cache, **{k: np.asarray(v) for k, v in params.items()})
  return params, float((predict(params, te_x) == te_y).mean())
