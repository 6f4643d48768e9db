"""Closed-form tests of common/diffusion/schedules.py (value tables, derivatives, EDM grids)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.diffusion import schedules
from common.errors import ConfigError

T_TABLE = np.array([0.0, 0.25, 0.5, 0.75, 1.0], np.float32)

# Spec A.3 value table: lambda at t = 0, .25, .5, .75, 1.
SHIFTED_64 = {
    128: [13.6, 0.37, -1.39, -3.15, -16.4],
    256: [12.2, -1.01, -2.77, -4.53, -17.8],
    512: [10.8, -2.40, -4.16, -5.92, -19.2],
}
SID2 = {
    128: [12.8, 3.13, 0.0, -3.13, -12.8],
    256: [11.4, 1.74, -1.39, -4.52, -14.2],
    512: [10.0, 0.36, -2.77, -5.90, -15.6],
}


@pytest.mark.parametrize("d", [128, 256, 512])
def test_spec_value_table_shifted64(d):
  sched = schedules.get_logsnr_schedule("shifted_cosine", image_d=d, noise_d=64)
  np.testing.assert_allclose(sched.logsnr(T_TABLE), SHIFTED_64[d], atol=0.05)


@pytest.mark.parametrize("d", [128, 256, 512])
def test_spec_value_table_sid2(d):
  sched = schedules.get_logsnr_schedule("sid2", image_d=d)
  # The table rounds -10 - 2 log 16 = -15.545 to -15.6, hence 0.06 rather than 0.05.
  np.testing.assert_allclose(sched.logsnr(T_TABLE), SID2[d], atol=0.06)
  np.testing.assert_allclose(sched.logsnr(jnp.array([1.0])), [-10 + 2 * math.log(32 / d)],
                             atol=1e-4)


def test_cosine_endpoints_and_unclipped_form():
  sched = schedules.CosineSchedule(-15.0, 15.0)
  np.testing.assert_allclose(sched.logsnr(jnp.array([0.0, 1.0])), [15.0, -15.0], atol=1e-3)
  # Away from the clip, the clipped cosine is close to the unclipped -2 log tan(pi t / 2).
  t = jnp.array([0.3, 0.5, 0.7])
  np.testing.assert_allclose(sched.logsnr(t), -2 * np.log(np.tan(np.pi * np.array(t) / 2)),
                             atol=2e-3)


def test_interpolated_sid_form():
  """SiD 32->256 at d = 512: lambda = t lambda_shift(32) + (1 - t) lambda_shift(256)."""
  sched = schedules.get_logsnr_schedule("interpolated_cosine", image_d=512)
  low = schedules.ShiftedCosineSchedule(image_d=512, noise_d=32)
  high = schedules.ShiftedCosineSchedule(image_d=512, noise_d=256)
  t = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(sched.logsnr(t), t * low.logsnr(t) + (1 - t) * high.logsnr(t),
                             atol=1e-4)


ALL_SCHEDULES = [
    schedules.CosineSchedule(),
    schedules.CosineSchedule(-10.0, 12.0),
    schedules.ShiftedCosineSchedule(image_d=256, noise_d=64),
    schedules.InterpolatedCosineSchedule(image_d=512),
    schedules.SiD2Schedule(image_d=256),
]


@pytest.mark.parametrize("sched", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_derivative_matches_autodiff(sched):
  t = jnp.linspace(0.0, 1.0, 21)
  auto = -jax.vmap(jax.grad(lambda s: sched.logsnr(s)))(t)
  closed = sched.neg_dlogsnr_dt(t)
  assert closed.dtype == jnp.float32
  np.testing.assert_allclose(closed, auto, rtol=2e-3)
  assert np.all(np.asarray(closed) > 0)  # lambda strictly decreasing in t
  assert np.all(np.diff(np.asarray(sched.logsnr(t))) < 0)


def test_sid2_derivative_constant():
  t = jnp.linspace(0.05, 0.95, 7)
  base = schedules.CosineSchedule(-10.0, 10.0)
  diff = schedules.SiD2Schedule(image_d=256).neg_dlogsnr_dt(t) - base.neg_dlogsnr_dt(t)
  np.testing.assert_allclose(diff, 2 * math.log(512 / 32), atol=1e-3)
  np.testing.assert_allclose(2 * math.log(512 / 32), 5.545, atol=1e-3)


def test_float32_math_for_other_input_dtypes():
  sched = schedules.SiD2Schedule(image_d=128)
  t32 = jnp.array([0.0, 0.125, 0.5, 1.0], jnp.float32)  # exactly representable in bf16
  out = sched.logsnr(t32.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, sched.logsnr(t32), atol=1e-6)
  assert sched.neg_dlogsnr_dt(t32.astype(jnp.bfloat16)).dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(sched.neg_dlogsnr_dt(t32))))


def test_factory_errors():
  with pytest.raises(ConfigError, match="Unknown logSNR schedule"):
    schedules.get_logsnr_schedule("linear")
  with pytest.raises(ConfigError, match="image_side"):
    schedules.get_logsnr_schedule("sid2", image_side=64)
  with pytest.raises(ConfigError):
    schedules.get_logsnr_schedule("cosine", logsnr_min=5.0, logsnr_max=-5.0)
  assert isinstance(schedules.get_logsnr_schedule("cosine"), schedules.CosineSchedule)


def test_edm_sigmas_eq5():
  n, smin, smax, rho = 18, 0.002, 80.0, 7.0
  s = np.asarray(schedules.edm_sigmas(n, smin, smax, rho))
  assert s.shape == (n + 1,) and s.dtype == np.float32
  i = np.arange(n)
  ref = (smax**(1 / rho) + i / (n - 1) * (smin**(1 / rho) - smax**(1 / rho)))**rho
  np.testing.assert_allclose(s[:-1], ref, rtol=1e-5)
  assert s[-1] == 0.0
  np.testing.assert_allclose([s[0], s[-2]], [smax, smin], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(schedules.edm_sigmas(1)), [80.0, 0.0], rtol=1e-6)


def test_edm_sigmas_guidance_interval_indices():
  """Spec A.7: steps 17..22 of the 32-step EDM grid span sigma in [0.283, 1.609]."""
  s = np.asarray(schedules.edm_sigmas(32))
  np.testing.assert_allclose([s[17], s[22]], [1.609, 0.283], atol=2e-3)


def test_lognormal_sigma_moments():
  sig = schedules.sample_lognormal_sigma(jax.random.key(0), (20000,), -0.6, 1.2)
  assert sig.dtype == jnp.float32 and np.all(np.asarray(sig) > 0)
  log_s = np.log(np.asarray(sig))
  assert abs(log_s.mean() - (-0.6)) < 0.04
  assert abs(log_s.std() - 1.2) < 0.04
