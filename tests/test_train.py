"""fsmnet-train end to end on the demo data: learning, 1 vs 2 devices, SIGTERM, clear errors.

Exact resume and several processes are in test_train_resume.py, the train step itself in
test_train_step.py; runs go through the real CLI in subprocesses (tests/training_runs.py)."""

import json
import signal
import subprocess
import sys
import time

from absl import flags
import jax
import numpy as np
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax import inference
from fsmnet_jax.cli import distributed
from fsmnet_jax.model import FSMNet
from training_runs import (REPO, cli_env, cli_command, train_run, saved_steps, saved_state,
                           assert_bitwise_equal, assert_same_trajectory, logged_losses)


# One process, the step fsmnet-train runs on meshes of 1 and 2 of its devices, from the same
# parameters on the same three batches; argv: the data root, the output .npz.
ONE_AND_TWO_DEVICES = r"""
import itertools, sys
import jax, numpy as np
from fsmnet_jax import mesh as mesh_lib, train
from fsmnet_jax.configs import tiny
from fsmnet_jax.data import pipeline
from fsmnet_jax.model import build_model
config = tiny.get_config()
config.data.root, config.train.batch_size = sys.argv[1], 8
model = build_model(config)
batches = list(itertools.islice(pipeline.make_loader(config, 'train', 8), 3))
initial = jax.device_get(train.create_train_state(config, model, train.make_mesh(config)).params)
saved = {}
for devices in (1, 2):
  mesh = mesh_lib.make_mesh(jax.devices()[:devices])
  state = train.create_train_state(config, model, mesh, initial)
  step = train.jit_train_step(config, mesh, state)
  for number, batch in enumerate(batches, 1):
    batch = mesh_lib.global_batch({k: batch[k] for k in train.TRAIN_KEYS}, mesh_lib.rows(mesh))
    state, metrics = step(state, batch)
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    saved |= {f'{devices}/{number}/{i}': leaf for i, leaf in enumerate(leaves)}
    saved[f'{devices}/{number}/loss'] = np.asarray(metrics['loss'])
saved |= {f'initial/{i}': leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(initial))}
np.savez(sys.argv[2], **saved)
"""


def test_one_and_two_devices_train_alike(tmp_path, data_root, compile_cache):
  """The whole tiny FSMNet (its phase branch is where float32 rounding matters most), stepped
  as fsmnet-train steps it on 1 and on 2 devices. (fsmnet-train itself on more devices and
  processes, the sharded optimizer state among it, on the spatial branch:
  test_train_resume.py.)"""
  done = subprocess.run([sys.executable, '-c', ONE_AND_TWO_DEVICES, str(data_root),
                         tmp_path / 'out.npz'], env=cli_env(2, compile_cache),
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(tmp_path / 'out.npz') as saved:
    leaves = lambda prefix: [saved[k] for k in saved.files
                             if k.startswith(prefix) and not k.endswith('loss')]
    params = [{step: leaves(f'{devices}/{step}/') for step in (1, 3)} for devices in (1, 2)]
    losses = [{step: float(saved[f'{devices}/{step}/loss']) for step in (1, 2, 3)}
              for devices in (1, 2)]
    assert_same_trajectory(*params, leaves('initial/'), *losses)


def test_loss_goes_down_on_demo_data(tmp_path, data_root, compile_cache):
  """40 steps at 10x the default learning rate: learning shows in fewer steps."""
  train_run(tmp_path, data_root, compile_cache, '--config.train.num_steps=40',
            '--config.train.learning_rate=1e-3', '--config.train.checkpoint_every=1000',
            '--config.eval.every=20', '--config.train.keep_checkpoints=1',
            '--config.train.peak_tflops=0.01', '--config.train.profile_steps=(30,31)',
            full_model=True)
  losses = logged_losses(tmp_path)
  first = np.mean([losses[s] for s in range(1, 11)])
  last = np.mean([losses[s] for s in range(31, 41)])
  assert last < 0.9 * first, (first, last)  # measured: 1.118 -> 0.925 (per-step noise ~5%)
  saved_config = json.loads((tmp_path / 'config.json').read_text())
  assert saved_config['train']['learning_rate'] == 1e-3
  assert saved_config['data']['root'] == str(data_root)
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  eval_lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
                if 'eval_psnr' in line]
  # measured: 20.27 dB against 19.56 dB for the zero-filled input after 40 steps
  assert [m['step'] for m in eval_lines] == [20, 40]
  assert eval_lines[-1]['eval_psnr'] > eval_lines[-1]['eval_zero_filled_psnr'] + 0.3
  best = max(eval_lines, key=lambda m: m['eval_psnr'])['step']
  assert set(saved_steps(tmp_path)) == {40, best}  # the latest (keep_checkpoints=1), the best
  # Speed at every logged step: images/s and step time agree with the batch of 8; the FLOPs
  # behind the MFU are the compiled step's, one number for the whole run.
  speeds = [m for m in map(json.loads, (tmp_path / 'metrics.jsonl').read_text().splitlines())
            if 'train_loss' in m]
  assert len(speeds) == 40
  for m in speeds:
    assert m['speed_images_per_s'] * m['speed_step_seconds'] == pytest.approx(8)
    assert 0 <= m['speed_input_seconds'] < m['speed_step_seconds']
  flops = [m['speed_mfu'] * 0.01e12 * m['speed_step_seconds'] for m in speeds]
  assert min(flops) > 0 and max(flops) == pytest.approx(min(flops), rel=1e-9)
  assert list((tmp_path / 'profile').glob('plugins/profile/*/*.xplane.pb'))  # steps 30-31
  # What fsmnet-eval / fsmnet-reconstruct read from a workdir: the latest step's parameters.
  params, _ = inference.load_params(tmp_path, FSMNet(**tiny.get_config().model))
  assert_bitwise_equal(params, saved_state(tmp_path, 40)['params'])


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, data_root, compile_cache):
  process = subprocess.Popen(
      cli_command(tmp_path, data_root, '--config.train.num_steps=100000',
                  '--config.train.checkpoint_every=100000'),
      env=cli_env(1, compile_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, cwd=REPO)
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    metrics = tmp_path / 'metrics.jsonl'
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  [step] = saved_steps(tmp_path)
  assert step >= 2 and f'SIGTERM received: saved step {step}' in stderr
  assert int(saved_state(tmp_path)['step']) == step


def test_fsmnet_train_runs_in_float64(tmp_path, data_root, compile_cache):
  """What a user gets from `JAX_ENABLE_X64=1 fsmnet-train --config.train.compute_dtype=float64`:
  a run whose checkpoints, optimizer state included, are float64 (spatial branch; the whole
  model's float64 step against the reference: test_train_parity.py)."""
  result = subprocess.run(
      cli_command(tmp_path, data_root, '--config.train.compute_dtype=float64',
                  '--config.train.num_steps=2'),
      env={**cli_env(1, compile_cache), 'JAX_ENABLE_X64': '1'}, capture_output=True, text=True,
      timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  state = saved_state(tmp_path)
  assert int(state['step']) == 2
  floats = [x for x in jax.tree_util.tree_leaves((state['params'], state['opt_state']))
            if np.issubdtype(np.asarray(x).dtype, np.floating)]
  assert floats and all(np.asarray(x).dtype == np.float64 for x in floats)
  assert any('eval_psnr' in line for line in (tmp_path / 'metrics.jsonl').read_text().splitlines())


@pytest.mark.parametrize('overrides, devices, message', [
    (['--config.train.no_such_key=1'], 1, 'no_such_key'),
    (['--config.train.batch_size=6'], 4, 'config.train.batch_size=6 must be a positive multiple'),
    (['--config.data.image_size=36'], 1, 'config.data.image_size=36 must be divisible by 8'),
    (['--config.train.on_nonfinite=ignore'], 1,
     "config.train.on_nonfinite='ignore': use one of stop, skip"),
])
def test_bad_configs_fail_clearly_before_any_work(tmp_path, data_root, compile_cache, overrides,
                                                  devices, message):
  result = train_run(tmp_path / 'run', data_root, compile_cache, *overrides, devices=devices,
                     check=False)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_a_workdir_that_cannot_be_written_fails_before_any_work(tmp_path, data_root,
                                                               compile_cache):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  result = train_run(blocker / 'run', data_root, compile_cache, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f'fsmnet-train: error: --workdir {blocker / "run"}: cannot write checkpoints there '
      f'(Not a directory)')
  assert blocker.read_text() == 'not a folder'


def test_a_diverging_run_stops_naming_the_step_and_its_slices(tmp_path, data_root,
                                                             compile_cache):
  # A learning rate of 1e30 (unclipped) makes the parameters ~1e30 after step 1: the forward
  # pass of step 2 overflows.
  result = train_run(tmp_path, data_root, compile_cache, '--config.train.learning_rate=1e30',
                     '--config.train.clip_norm=0', '--config.train.checkpoint_every=1',
                     check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("fsmnet-train: error: non-finite loss or gradients at step 2 "
                              "(this process's batch: DemoBraTS_"), last_line
  assert last_line.count('_t2.nii.gz slice') >= 1 and 'Traceback' not in result.stderr
  assert last_line.endswith(f'stopped without saving it. The last checkpoint in '
                            f'{tmp_path / "checkpoints"} is intact '
                            f"(config.train.on_nonfinite='stop').")
  assert saved_steps(tmp_path) == [1]
  state = saved_state(tmp_path, 1)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state))


def test_only_tasks_that_srun_started_join_a_multi_host_run():
  """In a SLURM allocation of several tasks, srun starts a command once per task (each with its
  SLURM_PROCID); a command run in the allocation without srun is one process alone."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # the flags' defaults: no coordinator, no --distributed
  assert not distributed.is_multi_host({})
  assert not distributed.is_multi_host({'SLURM_NTASKS': '4'})  # salloc -n 4, no srun
  assert not distributed.is_multi_host({'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'})
  assert distributed.is_multi_host({'SLURM_NTASKS': '4', 'SLURM_PROCID': '2'})
