"""benchmarks/bench_device_suite.sh, the one script for the day an accelerator is at hand, runs end
to end on the CPU with tiny settings (TINY=1): every part exits 0 and prints its table."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_suite_runs_with_tiny_settings(tmp_path):
  proc = subprocess.run(["bash", "benchmarks/bench_device_suite.sh", str(tmp_path)], cwd=ROOT,
                        env=dict(os.environ, TINY="1", PYTHON=sys.executable), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  for part in ("train_step", "ternary_matmul", "fp8_adamw", "inception"):
    assert f"{part}: exit 0" in proc.stdout
    assert (tmp_path / f"{part}.txt").stat().st_size > 0
  assert "predicted GiB" in (tmp_path / "train_step.txt").read_text()
