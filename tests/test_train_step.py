"""The train step itself, in this process (one CPU device): a non-finite step changes nothing,
EMA, gradient accumulation, bfloat16 compute, learning-rate schedules; the non-finite guard's
skip policy. fsmnet-train end to end is in test_train.py."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.configs import default, tiny
from fsmnet_jax import mesh as mesh_lib, train
from fsmnet_jax.data.pipeline import SliceRecord
from fsmnet_jax.model import build_model
from fsmnet_jax.throughput import compiled_flops
from training_runs import SPATIAL_BRANCH, UNOPTIMIZED_CODE, assert_bitwise_equal, relative_l2


class _Slices:
  """A data source's `record` for the guard's messages."""

  def record(self, key):
    return SliceRecord(key, f'S{key // 10}_t2.nii.gz', key % 10, f'S{key // 10}')


def test_skipping_non_finite_steps_names_them_and_stops_a_diverged_run(caplog):
  guard = train._NonFiniteGuard('skip', 2, _Slices(), Path('/runs/a/checkpoints'))
  batch = {k: np.zeros((3, 4, 4, 1), np.float32) for k in train.TRAIN_KEYS}
  batch['aux'][1, 2, 2] = np.nan
  batch['key'] = np.array([11, 12, 23])
  with caplog.at_level('WARNING'):
    guard.watch(1, np.bool_(False), batch)
    assert not caplog.records  # read only once the next step is queued
    guard.watch(2, np.bool_(True), batch)
  assert caplog.messages == [
      "non-finite loss or gradients at step 1 (this process's batch: S1/S1_t2.nii.gz slice 1, "
      "2 (non-finite aux); S2/S2_t2.nii.gz slice 3): update skipped"]
  for step in (3, 4):  # a finite step resets the count: two skips in a row are allowed
    guard.watch(step, np.bool_(False), batch)
  guard.flush()
  guard.watch(5, np.bool_(False), batch)
  with pytest.raises(train.NonFiniteStepError, match=(
      r'^non-finite loss or gradients 3 steps in a row, the last at step 5 .*'
      r"The last checkpoint in /runs/a/checkpoints is intact \(config.train.on_nonfinite='skip'\)")):
    guard.flush()


def _train_step(**train_overrides):
  """(initial state, jitted train step, a random batch) of the tiny model's spatial branch, batch
  4 (the step's logic is the whole model's; it compiles ~6x faster)."""
  config = tiny.get_config()
  config.train.batch_size = 4
  config.train.update(train_overrides)
  config.model.update(SPATIAL_BRANCH)
  mesh = train.make_mesh(config)
  state = train.create_train_state(config, build_model(config), mesh)
  rng = np.random.default_rng(0)
  batch = {k: rng.normal(size=(4, 32, 32, 1)).astype(np.float32)
           for k in ('target_under', 'aux', 'target')}
  step = jax.jit(train.make_train_step(config, mesh_lib.platform(mesh)),
                 compiler_options=UNOPTIMIZED_CODE)
  return state, step, batch


@pytest.fixture(scope='module')
def ema_step():
  """One step with EMA on, its compiled step shared by the tests below."""
  state, step, batch = _train_step(ema_decay=0.9)
  return state, step, batch, step(state, batch)


def test_a_non_finite_step_changes_nothing_but_the_step_count(ema_step):
  before, step, batch, (_, plain_metrics) = ema_step
  batch = {**batch, 'aux': batch['aux'].copy()}
  batch['aux'][2, 7, 9] = np.nan
  after, metrics = step(before, batch)
  assert bool(plain_metrics['finite']) and not bool(metrics['finite'])
  # Measured: the loss stays finite here (2.40); the gradient norm is NaN.
  assert not np.isfinite(metrics['grad_norm']) and int(after.step) == 1
  assert_bitwise_equal(after.replace(step=before.step), before)  # params, Adam, EMA, RNG


def test_ema_follows_the_parameters(ema_step):
  before, _, _, (after, _) = ema_step
  for ema, old, new in zip(*(jax.tree_util.tree_leaves(t) for t in (
      after.ema_params, before.params, after.params))):
    np.testing.assert_allclose(ema, 0.9 * np.asarray(old) + 0.1 * np.asarray(new),
                               rtol=1e-6, atol=1e-9)


def test_accumulated_gradients_and_flops_equal_the_whole_batch(ema_step):
  state, step, batch, (plain, plain_metrics) = ema_step
  _, accumulating_step, _ = _train_step(grad_accum_steps=2, ema_decay=0.9)
  compiled = accumulating_step.lower(state, batch).compile()
  accumulated, metrics = compiled(state, batch)
  np.testing.assert_allclose(metrics['loss'], plain_metrics['loss'], rtol=1e-6)
  # Two half-batch gradients summed instead of one: float32 summation order only (measured
  # relative L2 difference of the parameters after the step 1.0e-6, of the loss 2e-7).
  assert relative_l2(plain.params, accumulated.params) < 1e-5
  assert relative_l2(plain.ema_params, accumulated.ema_params) < 1e-5
  # fsmnet-train's MFU: XLA counts the micro-batch loop's body once, so the count is scaled by
  # its trips (measured: 3.215e8 whole, 1.621e8 counted with accumulation, 2x that is 0.8%
  # more: the adds of the two gradients, the update counted once in both).
  whole, body = (compiled_flops(c) for c in (step.lower(state, batch).compile(), compiled))
  assert body < 0.6 * whole
  assert compiled_flops(compiled, loop_trips=2) == pytest.approx(whole, rel=0.05)


def test_bfloat16_compute_keeps_float32_params_and_loss(tiny_model_and_params):
  before, step, batch = _train_step(compute_dtype='bfloat16')
  bf16, metrics = step(before, batch)
  assert metrics['loss'].dtype == np.float32
  assert {x.dtype for x in jax.tree_util.tree_leaves(bf16.params)} == {np.dtype('float32')}
  # The whole model's loss, through the step's own loss function: its FFT blocks keep float32
  # themselves. (Its forward pass alone: the whole train step would compile ~5x longer.)
  model, params = tiny_model_and_params
  loss = lambda dtype: jax.jit(functools.partial(
      train.micro_batch_loss, model.apply, compute_dtype=dtype, rng=jax.random.key(0)),
                               compiler_options=UNOPTIMIZED_CODE)(params, batch)[0]
  bfloat16_loss, float32_loss = loss(jnp.bfloat16), loss(jnp.float32)
  assert bfloat16_loss.dtype == np.float32
  # Measured 7.6e-6 relative at initialisation (the output is mostly the float32 input plus
  # a small residual); a bfloat16 rounding of everything would be ~4e-3.
  np.testing.assert_allclose(bfloat16_loss, float32_loss, rtol=1e-3)


def test_a_float64_loss_does_not_round_the_float32_batch():
  """The pipeline's batches are float32; with float64 parameters the loss, the FFTs of the
  target included, is float64 throughout: the same as from a float64 copy of the batch."""
  rng = np.random.default_rng(0)
  images = {k: rng.random((2, 16, 16, 1)).astype(np.float32) for k in train.TRAIN_KEYS}
  with jax.enable_x64(True):
    params = {'scale': jnp.asarray(0.7, jnp.float64)}
    # A stand-in network: both outputs are functions of the parameters and inputs alone.
    apply_fn = lambda variables, x, aux, rngs: {
        'img_out': x * variables['params']['scale'], 'img_fre': aux + x**2}
    loss = lambda batch: train.micro_batch_loss(apply_fn, params, batch,
                                                compute_dtype=jnp.float64,
                                                rng=jax.random.key(0))[0]
    from_float32 = loss({k: jnp.asarray(v) for k, v in images.items()})
    from_float64 = loss({k: jnp.asarray(v, jnp.float64) for k, v in images.items()})
  assert from_float32.dtype == np.float64
  assert float(from_float32) == float(from_float64)


@pytest.mark.parametrize('schedule, factor', [('reference', 0.5), ('paper', 0.1),
                                              ('constant', 1.0)])
def test_learning_rate_schedules(schedule, factor):
  config = default.get_config().train
  config.schedule = schedule
  lr = train.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(19_999), lr(20_000), lr(40_000)],
                             np.array([1, 1, factor, factor**2]) * 1e-4, rtol=1e-6)
