"""notebooks/colab_tpu.ipynb runs headless on CPU with its tiny settings (FRUGAL_NOTEBOOK_TINY=1)."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


def test_colab_notebook_runs_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert "parameters" in nb.cells[1].metadata.get("tags", [])
  monkeypatch.setenv("FRUGAL_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("FRUGAL_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # The kernel starts in the repository root, so it imports this checkout (and skips the install).
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}}).execute()
  outputs = {}
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      outputs[i] = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  text = "\n".join(outputs.values())
  assert "skipping the install" in text
  assert "cpu device(s)" in text
  assert "SYNTHETIC" in text and "DatasetInfo(SYNTHETIC" in text
  images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 2                                  # the digits grid and the synthetic one
  for name in ("sid2_digits", "sid2_in128_synthetic"):
    assert (tmp_path / name / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / name / "checkpoints" / "2").is_dir()
