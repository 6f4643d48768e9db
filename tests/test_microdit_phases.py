"""MicroDiT's four training phases end to end on a CPU (`configs/microdit.py:pN,runlocal`): a tiny
model on SYNTHETIC latents and caption embeddings of each phase's latent shape, chained through
`config.init_from` as the official recipe chains them (micro_diffusion `train_e2e.sh`,
`configs/res_*.yaml`): phase 2 resumes phase 1's whole state and step, phase 3 takes phase 2's
weights only at 512 px (the fixed position embedding interpolated), phase 4 resumes phase 3's
state. Each phase ends with its sample grid, drawn from prompts through the text encoder and
decoded by the (untrained, stand-in) autoencoder."""

import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from common.training import sharding
from common.training import trainer
from common.training.experiment import Experiment
from configs import microdit


def _config(phase: str, tmp_path):
  c = microdit.get_config(f"{phase},runlocal")
  c.train.tensorboard = False
  if c.init_from.path:  # the previous phase's workdir, here under tmp_path
    previous = microdit.PHASES[microdit.PHASES.index(phase) - 1]
    assert c.init_from.path == microdit.WORKDIRS[previous] + "_runlocal"
    c.init_from.path = str(tmp_path / previous)
  return c


def _run(phase: str, tmp_path, capsys) -> tuple[dict, str]:
  """Trains one phase in tmp_path/phase; returns (its config, what the trainer printed)."""
  c = _config(phase, tmp_path)
  result = trainer.train(c, str(tmp_path / phase))
  out = capsys.readouterr().out
  assert result["step"] == c.train.steps and np.isfinite(result["loss"]), (phase, result)
  assert "SYNTHETIC random images and caption embeddings" in out
  grid = tmp_path / phase / "samples" / f"step_{c.train.steps:07d}.png"
  assert f"wrote {grid}" in out
  side = 8 * c.model.input_size          # decoded through the f8 autoencoder
  with Image.open(grid) as im:           # one image per prompt, 8 columns
    assert im.mode == "RGB" and im.size[0] >= 8 * side and im.size[1] >= side, im.size
  return c, out


def _adam_counts(c, workdir) -> set[int]:
  """The optimizer's step counters in the newest checkpoint of `workdir`."""
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  _, state = trainer.restore_newest(exp, workdir)
  return {int(v) for p, v in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
          if jax.tree_util.keystr(p).endswith(".count")}


def _p1_then_p2(tmp_path, capsys):
  c1, _ = _run("p1_256_masked", tmp_path, capsys)
  assert (c1.model.input_size, c1.model.mask_ratio, c1.data.text_len) == (32, 0.75, 32)
  c2, out = _run("p2_256_unmasked", tmp_path, capsys)
  # Phase 2 continues phase 1's optimizer state and step count (10 + 5).
  assert "initialised params, EMA and optimizer state from the step-10 checkpoint" in out
  assert (c2.model.mask_ratio, c2.train.steps) == (0.0, 15)
  assert _adam_counts(c2, str(tmp_path / "p2_256_unmasked")) == {15}


def test_phases_1_and_2_chain_and_end_with_their_grids(tmp_path, capsys):
  _p1_then_p2(tmp_path, capsys)


@pytest.mark.slow   # four phases, two of them at 64 x 64 latents: ~3 min on 2 busy CPU cores
def test_all_four_phases_chain_and_end_with_their_grids(tmp_path, capsys):
  _p1_then_p2(tmp_path, capsys)
  c3, out = _run("p3_512_masked", tmp_path, capsys)
  # Phase 3: phase 2's weights at 512 px (positions interpolated by 2), fresh optimizer, step 0.
  assert (c3.model.input_size, c3.model.pos_interp_scale, c3.model.mask_ratio) == (64, 2.0, 0.75)
  assert "initialised params and EMA from the step-15 checkpoint" in out
  assert "fresh optimizer state, step 0" in out
  assert _adam_counts(c3, str(tmp_path / "p3_512_masked")) == {6}
  c4, out = _run("p4_512", tmp_path, capsys)
  assert "initialised params, EMA and optimizer state from the step-6 checkpoint" in out
  assert (c4.model.mask_ratio, c4.train.steps) == (0.0, 9)
  assert _adam_counts(c4, str(tmp_path / "p4_512")) == {9}
  assert os.path.isfile(tmp_path / "p4_512" / "samples" / "step_0000009.png")


def test_latents_with_trimmed_padding_are_refused_for_a_network_that_reads_the_padding(tmp_path):
  from common.data import captions  # pylint: disable=import-outside-toplevel
  from common.data import latents  # pylint: disable=import-outside-toplevel
  from common.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from common.training import contracts  # pylint: disable=import-outside-toplevel
  from configs import sid2_t2i_fashion  # pylint: disable=import-outside-toplevel
  from tests import test_precompute as tp  # pylint: disable=import-outside-toplevel
  source = captions.CaptionedFashionMNIST(tp._write_fmnist(str(tmp_path / "fmnist"), 40), "train")
  for name, trim in (("full", False), ("trim", True)):
    tp._write(tmp_path / name, source, limit=40, trim_padding=trim)
  c = microdit.get_config("fashion,runlocal")
  c.model.caption_len, c.model.caption_channels = 8, 16   # the stand-in text encoder's
  c.data.path = str(tmp_path / "trim")
  c.train.tensorboard = False
  with pytest.raises(ConfigError, match=r"--trim_padding.*attends to every caption position"):
    trainer.train(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")
  # The declared attribute decides, not the family: MicroDiT reads the padding, SiD2's
  # text-conditional U-ViT masks it; untrimmed latents pass the check.
  sid2 = sid2_t2i_fashion.get_config("runlocal")
  assert contracts.reads_caption_padding(Experiment(c, sharding.make_mesh(c.mesh)).abstract_model)
  assert not contracts.reads_caption_padding(
      Experiment(sid2, sharding.make_mesh(sid2.mesh)).abstract_model)
  latents.check_padding_kept(ml_collections.ConfigDict({"name": "latents",
                                                         "path": str(tmp_path / "full")}),
                             reader="MicroDiT")


def test_missing_or_mismatched_encoders_stop_a_phase_before_its_first_step(tmp_path):
  from common.errors import ConfigError, DataNotFoundError, ShapeError  # pylint: disable=import-outside-toplevel

  def check(**overrides):
    c = microdit.get_config("p1_256_masked,runlocal")
    c.update(overrides)
    Experiment(c, sharding.make_mesh(c.mesh)).check_generation()

  with pytest.raises(DataNotFoundError, match="/nowhere/DFN5B-CLIP-ViT-H-14-378"):
    check(text_encoder="/nowhere/DFN5B-CLIP-ViT-H-14-378")
  with pytest.raises(DataNotFoundError, match="/nowhere/sdxl-vae"):
    check(autoencoder="/nowhere/sdxl-vae")
  with pytest.raises(ConfigError, match="set config.text_encoder"):
    check(text_encoder="")
  with pytest.raises(ShapeError, match="16 latent channels"):
    check(autoencoder="untrained:f8c16")
  c = _config("p1_256_masked", tmp_path)
  c.text_encoder = str(tmp_path / "DFN5B-CLIP-ViT-H-14-378")
  with pytest.raises(DataNotFoundError, match="DFN5B-CLIP-ViT-H-14-378"):
    trainer.train(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "5")
  # The XL phases name the official encoders' local folders and the COCO FID-30K files.
  for phase in microdit.PHASES:
    x = microdit.get_config(phase)
    assert (x.text_encoder, x.autoencoder) == (microdit.TEXT_ENCODER, microdit.AUTOENCODER)
    assert x.eval.coco.to_dict() == microdit.coco_fid30k().to_dict()
    assert (x.eval.reference, x.eval.num_samples) == ("", 30_000)
    assert x.sample.prompts == microdit.PROMPTS and x.train.num_grid_samples == 16
