"""Quality of our Fashion-MNIST autoencoder, trained by a plain jitted loop from its config.

    python benchmarks/study_autoencoder_fashion.py [--config_arg=] [--steps=N] [--eval=10000]

Trains `configs/autoencoder_fashion.py` (its model, recipe, optimizer, EMA, batch size and steps; no
checkpoints), then reports on the test split, through the EMA weights and the posterior mean:
reconstruction MSE and PSNR (pixels in [0, 1]), and the accuracy of a Fashion-MNIST classifier
(scikit-learn logistic regression on pixels, trained on 10k training images) on the real test images
and on their reconstructions. The training loop calls the recipe exactly as the trainer does
(`recipe.loss(model, batch, key)`), so the figures hold for `launch/main.py` runs of the same config.
"""

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from common.data.sources import FASHION_MNIST_DEFAULT_DIR, load_fashion_mnist  # noqa: E402
from common.ema import ema_update  # noqa: E402
from common.experiment import build_model  # noqa: E402
from common.optim import make_optimizer  # noqa: E402
from configs import autoencoder_fashion  # noqa: E402


def make_recipe(cfg):
  module, cls = cfg.name.rsplit(".", 1)
  kwargs = {k: v for k, v in cfg.to_dict().items() if k != "name"}
  return getattr(importlib.import_module(module), cls)(**kwargs)


def train(config, steps: int, log_every: int = 100):
  """Returns (graphdef, ema params, seconds, steps/s)."""
  images, _ = load_fashion_mnist(config.data.get("path", None) or FASHION_MNIST_DEFAULT_DIR, "train")
  x_all = images.astype(np.float32) / 127.5 - 1.0
  model = build_model(config.model, jax.random.key(config.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  recipe = make_recipe(config.diffusion)
  tx = make_optimizer(config.optim, steps)
  opt_state = tx.init(params)
  tc = config.train

  def loss_fn(p, x, key):
    per_example, metrics = recipe.loss(nnx.merge(graphdef, p), {"x": x, "cond": {}}, key)
    return per_example.mean(), metrics

  @jax.jit
  def step_fn(p, o, ema, x, step, key):
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
    upd, o = tx.update(g, o, p)
    p = optax.apply_updates(p, upd)
    ema = ema_update(ema, p, step + 1, decay=float(tc.ema_decay), warmup=bool(tc.ema_warmup))
    return p, o, ema, dict(metrics, loss=loss)

  rng = np.random.default_rng(config.seed)
  ema = params
  bs = int(tc.batch_size)
  t0 = None
  for step in range(steps):
    idx = rng.integers(0, x_all.shape[0], bs)
    x = x_all[idx]
    if config.data.get("random_flip", False):
      flip = rng.random(bs) < 0.5
      x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    params, opt_state, ema, m = step_fn(params, opt_state, ema, x, step,
                                        jax.random.fold_in(jax.random.key(1), step))
    if step == 0:
      jax.block_until_ready(m)
      t0 = time.perf_counter()
    if (step + 1) % log_every == 0 or step + 1 == steps:
      print(f"step {step + 1}: " + ", ".join(f"{k} {float(v):.4g}" for k, v in m.items()), flush=True)
  jax.block_until_ready(ema)
  secs = time.perf_counter() - t0
  return graphdef, ema, secs, (steps - 1) / secs


def evaluate(config, graphdef, ema, n_eval: int) -> dict:
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  d = config.data.get("path", None) or FASHION_MNIST_DEFAULT_DIR
  tr_x, tr_y = load_fashion_mnist(d, "train")
  te_x, te_y = load_fashion_mnist(d, "test")
  te_x, te_y = te_x[:n_eval], te_y[:n_eval]

  @jax.jit
  def recon(p, x):
    net = nnx.merge(graphdef, p)
    mean, logvar = net.encode_moments(x)
    return jnp.clip(net.decode(mean), -1, 1), mean, logvar

  outs, means, logvars = [], [], []
  for i in range(0, te_x.shape[0], 500):
    r, mu, lv = recon(ema, te_x[i:i + 500].astype(np.float32) / 127.5 - 1.0)
    outs.append(np.asarray(r))
    means.append(np.asarray(mu))
    logvars.append(np.asarray(lv))
  rec01 = (np.concatenate(outs) + 1.0) / 2.0
  real01 = te_x.astype(np.float32) / 255.0
  mse = float(np.mean((rec01 - real01) ** 2))
  per_image = np.mean((rec01 - real01) ** 2, axis=(1, 2, 3))
  clf = LogisticRegression(max_iter=200)
  clf.fit(tr_x[:10000].reshape(10000, -1) / 255.0, tr_y[:10000])
  acc_real = clf.score(real01.reshape(len(te_y), -1), te_y)
  # Reconstructions rounded to uint8, as a user would store them.
  rec_u8 = np.rint(rec01 * 255.0) / 255.0
  acc_rec = clf.score(rec_u8.reshape(len(te_y), -1), te_y)
  means = np.concatenate(means)
  return {"mse": mse, "psnr_db": 10 * np.log10(1.0 / mse),
          "psnr_db_mean_per_image": float(np.mean(10 * np.log10(1.0 / per_image))),
          "acc_real": acc_real, "acc_recon": acc_rec, "latent_mean": float(means.mean()),
          "latent_std": float(means.std()),
          "posterior_std_mean": float(np.exp(0.5 * np.concatenate(logvars)).mean())}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config_arg", default="")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--eval", type=int, default=10000)
  args = ap.parse_args()
  config = autoencoder_fashion.get_config(args.config_arg)
  steps = args.steps or int(config.train.steps)
  graphdef, ema, secs, rate = train(config, steps)
  print(f"trained {steps} steps in {secs:.1f} s ({rate:.2f} steps/s, after compilation)")
  for k, v in evaluate(config, graphdef, ema, args.eval).items():
    print(f"{k}: {v:.4f}")


if __name__ == "__main__":
  main()
