"""Bad-input corpus, area "export": hostile and damaged export folders (common/weights/deployment.py, the
autoencoder export of common/autoencoders.py) run through `launch/main.py --mode=sample
--checkpoint=EXPORT` and `launch/encode.py images --autoencoder=EXPORT`.

A name read from an export must be a registered plug-in (common/registry.py): the payloads name
callables that would create `d / MARKER` if they were called with the file's keys. The weights are
checked against the SHA-256 recorded in config.json at export time.
"""

import hashlib
import json
import pathlib

import numpy as np

from tests.bad_inputs.harness import Case, MARKER, Pristine, copy

_REDO = r"export again"
_MODEL_PLUGINS = r"one of \[.*'sid2\.model\.ResidualUViT'"


def _sample(export: pathlib.Path, d: pathlib.Path) -> list[str]:
  return ["launch/main.py", "--mode=sample", f"--checkpoint={export}", f"--workdir={d / 'out'}",
          "--num_samples=2"]


def _with_config(edit):
  """build(): a copy of the pristine export whose config.json `edit(meta, d)` changed, sampled."""
  def build(d: pathlib.Path, pristine: Pristine) -> list[str]:
    export = copy(pristine.export, d / "export")
    path = export / "config.json"
    meta = json.loads(path.read_text())
    meta = edit(meta, d)
    path.write_text(json.dumps(meta) if not isinstance(meta, (bytes, str)) else meta)
    return _sample(export, d)
  return build


def _set(key: str, value):
  """An edit that sets config.KEY (dotted) to `value(d)`."""
  def edit(meta, d):
    node, parts = meta["config"], key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value(d)
    return meta
  return edit


def _touch(d: pathlib.Path) -> list[str]:
  return ["touch", str(d / MARKER)]


def _with_params(damage):
  """build(): a copy of the pristine export whose params.safetensors `damage(bytes)` changed."""
  def build(d: pathlib.Path, pristine: Pristine) -> list[str]:
    export = copy(pristine.export, d / "export")
    path = export / "params.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    return _sample(export, d)
  return build


def _flip(data: bytes) -> bytes:
  """One bit flipped in the last tensor's bytes (safetensors itself checks only the header)."""
  data = bytearray(data)
  data[len(data) - 7] ^= 0x04
  return bytes(data)


# An autoencoder export written by hand (`save_autoencoder`'s layout): config.json naming the
# network, the latent normalisation and the SHA-256 of params.safetensors.
_AE_MODEL = {"name": "autoencoder.small_kl.SmallKLAutoencoder", "image_size": 8,
             "in_channels": 1, "channels": [4, 8], "blocks_per_level": 1, "mid_blocks": 1,
             "latent_channels": 2, "norm_groups": 2}


def _autoencoder(model: dict, damage=lambda b: b):
  """build(): an autoencoder export with `model` as its network (weights `damage`d after their
  checksum was recorded), encoded through launch/encode.py images."""
  def build(d: pathlib.Path, pristine: Pristine) -> list[str]:
    del pristine
    from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
    ae = d / "ae"
    ae.mkdir()
    data = st_numpy.save({"enc_in.kernel": np.zeros((3, 3, 1, 4), np.float32)})
    (ae / "params.safetensors").write_bytes(damage(data))
    (ae / "config.json").write_text(json.dumps({
        "format": "frugal-diffusion-autoencoder-v2", "model": model, "shift_factor": [0.0],
        "scaling_factor": [1.0], "image_shape": [8, 8, 1],
        "sha256": {"params.safetensors": hashlib.sha256(data).hexdigest()}}))
    np.savez(d / "images.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    return ["launch/encode.py", "images", f"--autoencoder={ae}", f"--input={d / 'images.npz'}",
            f"--output={d / 'latents.npz'}"]
  return build


CASES = [
    # No code from a file (issue 20, item 1): each plug-in key naming an unregistered object.
    Case(name="export/diffusion-subprocess-run",
         build=_with_config(_set("diffusion", lambda d: {"name": "subprocess.run",
                                                         "args": _touch(d)})),
         message=r"config\.diffusion\.name='subprocess\.run' read from .*config\.json is not in one "
                 r"of our packages; .*registered diffusion plug-in: one of \['vp', 'edm', "
                 r".*'common\.diffusion\.adm\.ADMDiffusion'",
         needs=("export",)),
    Case(name="export/model-os-system",
         build=_with_config(_set("model", lambda d: {"name": "os.system",
                                                     "command": " ".join(_touch(d))})),
         message=r"config\.model\.name='os\.system' read from .*config\.json is not in one of our "
                 r"packages; .*" + _MODEL_PLUGINS,
         needs=("export",)),
    Case(name="export/optim-builtins-eval",
         build=_with_config(_set("optim.name", lambda d: "builtins.eval")),
         message=r"optim\.name='builtins\.eval' read from .*config\.json is not in one of our "
                 r"packages; .*registered optimizer plug-in: one of \['adamw', "
                 r"'coat\.optim\.fp8_adamw'\]",
         needs=("export",)),
    Case(name="export/precision-registry-import-object",
         build=_with_config(_set("precision", lambda d: "common.registry.import_object")),
         message=r"config\.precision='common\.registry\.import_object' read from .*config\.json is "
                 r"not a registered precision plug-in; .*one of \['bf16', 'coat', "
                 r"'coat\.precision\.COAT', 'common\.nn\.numerics\.BF16'\]",
         needs=("export",)),
    Case(name="export/numerics-rule-os-system",
         build=_with_config(_set("numerics.rules", lambda d: [
             [".*", "os.system", {"command": " ".join(_touch(d))}]])),
         message=r"config\.numerics\.rules\[0\]='os\.system' read from .*config\.json is not in one "
                 r"of our packages; .*registered numerics plug-in: one of \[.*FullPrecision",
         needs=("export",)),
    Case(name="export/model-registered-for-another-kind",
         build=_with_config(_set("model.name", lambda d: "common.diffusion.adm.ADMDiffusion")),
         message=r"config\.model\.name='common\.diffusion\.adm\.ADMDiffusion' read from .*config\.json is not "
                 r"a registered model plug-in; .*" + _MODEL_PLUGINS,
         needs=("export",)),
    # A damaged export is refused (item 3).
    Case(name="export/params-flipped-bit",
         build=_with_params(_flip),
         message=r"params\.safetensors does not match the checksum recorded in .*config\.json at "
                 r"export time: changed or damaged; " + _REDO,
         needs=("export",)),
    Case(name="export/params-truncated",
         build=_with_params(lambda b: b[:len(b) // 2]),
         message=r"params\.safetensors does not match the checksum recorded in .*config\.json at "
                 r"export time: changed or damaged; " + _REDO,
         needs=("export",)),
    Case(name="export/older-format-without-checksums",
         build=_with_config(lambda meta, d: {**{k: v for k, v in meta.items() if k != "sha256"},
                                             "format": "frugal-diffusion/deployed-v1"}),
         message=r"config\.json is an export of an older format \(frugal-diffusion/deployed-v1, "
                 r"without checksums\); " + _REDO,
         needs=("export",)),
    # A config.json that is not what an export writes (item 5).
    Case(name="export/config-not-a-dict",
         build=_with_config(lambda meta, d: {**meta, "config": ["sid2", 1]}),
         message=r'config\.json: "config" is list, not an object; the export is damaged',
         needs=("export",)),
    Case(name="export/config-json-not-json",
         build=_with_config(lambda meta, d: '{"format": "frugal-diffusion/deployed-v2", "config": {'),
         message=r"config\.json is not valid JSON \(JSONDecodeError",
         needs=("export",)),
    Case(name="export/config-json-a-list",
         build=_with_config(lambda meta, d: [meta]),
         message=r"config\.json holds a JSON list, not an object",
         needs=("export",)),
    Case(name="export/format-missing",
         build=_with_config(lambda meta, d: {k: v for k, v in meta.items() if k != "format"}),
         message=r"config\.json was not written by --mode=export \(format None",
         needs=("export",)),
    Case(name="export/section-of-the-wrong-type",
         build=_with_config(_set("sample", lambda d: 7)),
         message=r"config\.json: config\.sample is an int \(7\), expected an object; the export is "
                 r"damaged",
         needs=("export",)),
    Case(name="export/model-key-of-the-wrong-type",
         build=_with_config(_set("model.channels", lambda d: "wide")),
         message=r"config\.model read from .*config\.json cannot build ResidualUViT: ValueError",
         needs=("export",)),
    Case(name="export/model-a-million-blocks",
         build=_with_config(_set("model.mid_blocks", lambda d: 10**6)),
         message=r"params\.safetensors holds \d+ tensors, the config\.json beside it implies at "
                 r"least 2000004",
         needs=("export",), timeout_s=60),
    # Our autoencoder export (loaded by launch/encode.py and launch/precompute.py).
    Case(name="export/autoencoder-subprocess-run",
         build=lambda d, p: _autoencoder({"name": "subprocess.run", "args": _touch(d)})(d, p),
         message=r"config\.model\.name='subprocess\.run' read from .*ae/config\.json is not in one "
                 r"of our packages; .*registered autoencoder plug-in: one of \[.*SmallKLAutoencoder"),
    Case(name="export/autoencoder-flipped-bit",
         build=_autoencoder(_AE_MODEL, _flip),
         message=r"ae/params\.safetensors does not match the checksum recorded in .*config\.json at "
                 r"export time: changed or damaged; export the autoencoder again"),
    Case(name="export/autoencoder-huge-network",
         build=_autoencoder({**_AE_MODEL, "blocks_per_level": 10**8}),
         message=r"params\.safetensors holds 1 tensors, the config\.json beside it implies at least "
                 r"3200000016"),
]
