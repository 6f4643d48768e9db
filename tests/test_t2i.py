"""Latent text-to-image through the trainer: our KL autoencoder trained by the trainer and exported,
captioned Fashion-MNIST precomputed with it and the embedded MiniLM, SiD2 text-to-image trained on the
latents and sampled from prompts, decoded to pixels (configs/sid2_t2i_fashion.py:runlocal)."""

import os

import numpy as np
import pytest

from common.training import sharding
from common.training import trainer
from common.errors import ConfigError
from common.training.experiment import Experiment
from common.autoencoders import load_autoencoder
from common.data import captions
from common.data import latents
from common.text import load_text_encoder
from configs import autoencoder_fashion
from configs import sid2_t2i_fashion
from configs import terdit
from tests.test_precompute import _write_fmnist


def test_latent_text_to_image_end_to_end(tmp_path):
  fmnist = _write_fmnist(str(tmp_path / "fmnist"), 96)
  ae_cfg = autoencoder_fashion.get_config("runlocal")
  ae_cfg.data.path = fmnist
  ae_cfg.train.steps = 4
  ae_cfg.train.tensorboard = False
  ae_dir = str(tmp_path / "ae")
  trainer.train(ae_cfg, ae_dir)
  from autoencoder.export import export_autoencoder  # pylint: disable=import-outside-toplevel
  export_autoencoder(ae_cfg, ae_dir, os.path.join(ae_dir, "export"), num_images=64)
  autoencoder = load_autoencoder(os.path.join(ae_dir, "export"))
  assert autoencoder.latent_shape((28, 28, 1)) == (7, 7, 4)

  data_dir = str(tmp_path / "latents")
  latents.write_dataset(captions.CaptionedFashionMNIST(fmnist, "train"), data_dir,
                        autoencoder=autoencoder, text_encoder=load_text_encoder("minilm"),
                        autoencoder_spec=os.path.join(ae_dir, "export"), text_encoder_spec="minilm",
                        shard_size=64, batch_size=32, progress_every_s=0.0)

  c = sid2_t2i_fashion.get_config("runlocal")
  c.autoencoder = os.path.join(ae_dir, "export")
  c.data.path = data_dir
  c.train.steps = 6
  c.train.tensorboard = False
  workdir = str(tmp_path / "t2i")
  res = trainer.train(c, workdir)
  assert res["step"] == 6 and np.isfinite(res["loss"])
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a photo of a sneaker\na photo of a bag\n")
  path = trainer.sample(c, workdir, num_samples=4, prompts_file=str(prompts))
  out = np.load(path)
  assert out["images"].shape == (4, 28, 28, 1) and out["images"].dtype == np.uint8
  assert list(out["prompts"]) == ["a photo of a sneaker", "a photo of a bag"] * 2
  # the config's default prompts are held-out phrasings only
  train_phrasings = set(captions.fashion_caption_templates("train"))
  assert not any(p in {captions.fashion_caption(l, t) for l in range(10) for t in train_phrasings}
                 for p in c.sample.prompts)

  # The same latents carry class labels: a class-conditional network (TerDiT) trains on them and
  # samples by class, decoded through the same autoencoder.
  k = terdit.get_config("runlocal")
  k.data = c.data
  k.autoencoder = c.autoencoder
  k.model.image_size, k.model.in_channels, k.model.patch_size = 7, 4, 1
  k.train.steps = 2
  k.train.tensorboard = False
  res = trainer.train(k, str(tmp_path / "terdit"))
  assert res["step"] == 2 and np.isfinite(res["loss"])
  out = np.load(trainer.sample(k, str(tmp_path / "terdit"), num_samples=4))
  assert out["images"].shape == (4, 28, 28, 1) and list(out["labels"]) == [0, 1, 2, 3]
  # Data without labels (-1: captioned folders, COCO) is refused for it, in one clear line.
  exp = Experiment(k, sharding.make_mesh(k.mesh))
  unlabelled = {"x": np.zeros((2, 7, 7, 4), np.float32), "cond": {"label": np.array([3, -1])}}
  with pytest.raises(ConfigError, match="class-conditional"):
    exp.model_batch(unlabelled)
