"""A sweep for launch/xm_launch.py: SiD2 digits at three learning rates and two seeds.

  python launch/xm_launch.py --config=configs/sid2_digits.py --workdir_root=workdirs/sweeps \
      --sweep_file=configs/sweeps/sid2_digits_lr.py

Args: "short" keeps one seed.
"""


def get_sweep(arg: str | None = None) -> list[dict]:
  seeds = (0,) if arg == "short" else (0, 1)
  return [{"optim.learning_rate": lr, "seed": seed}
          for lr in (3e-4, 1e-3, 3e-3) for seed in seeds]
