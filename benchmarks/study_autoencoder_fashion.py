"""Quality of our Fashion-MNIST autoencoder, trained by the project's trainer from its config.

    python benchmarks/study_autoencoder_fashion.py [--workdir workdirs/autoencoder_fashion]
        [--config_arg=] [--set key=value ...] [--steps=N] [--eval=10000]

Trains `configs/autoencoder_fashion.py` with `common.training.trainer.train`, as `launch/main.py
--mode=train` does (a run the workdir holds is resumed; a finished one is only evaluated, so
`--workdir=workdirs/ae_fashion` scores the autoencoder that `make fashion-latents` trained), then
reports on the test split, through the newest checkpoint's EMA weights and the posterior mean:
reconstruction MSE and PSNR (pixels in [0, 1]), and the accuracy of a Fashion-MNIST classifier
(scikit-learn logistic regression on pixels, trained on 10k training images) on the real test
images and on their reconstructions.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common.training import sharding
from common.training import trainer
from common.data.sources import FASHION_MNIST_DEFAULT_DIR, load_fashion_mnist  # noqa: E402
from common.training.experiment import Experiment  # noqa: E402
from configs import autoencoder_fashion  # noqa: E402
from configs.base import override  # noqa: E402
import studies  # noqa: E402  (benchmarks/studies.py)


def evaluate(config, graphdef, ema, n_eval: int) -> dict:
  """Test-set figures of the autoencoder `nnx.merge(graphdef, ema)` on the first `n_eval` images:
  {"mse", "psnr_db", "psnr_db_mean_per_image", "acc_real", "acc_recon", "latent_mean",
  "latent_std", "posterior_std_mean"}."""
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
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/autoencoder_fashion")
  ap.add_argument("--config_arg", default="")
  ap.add_argument("--set", action="append", default=[], help="config override key=value")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's own")
  ap.add_argument("--eval", type=int, default=10000, help="test images evaluated")
  args = ap.parse_args()
  config = override(autoencoder_fashion.get_config(args.config_arg), args.set)
  if args.steps:
    config.train.steps = args.steps
  config.train.tensorboard = False
  secs = studies.train(config, args.workdir)
  print(f"trained {int(config.train.steps)} steps in {args.workdir} ({secs:.1f} s in this call; "
        f"{studies.training_rate(args.workdir):.2f} steps/s, after compilation)")
  exp = Experiment(config, sharding.make_mesh(config.mesh))
  _, state = trainer.restore_newest(exp, args.workdir)
  for k, v in evaluate(config, exp.graphdef, state["ema"], args.eval).items():
    print(f"{k}: {v:.4f}")


if __name__ == "__main__":
  main()
