"""fsmnet-train's runs are one computation however they are split or stopped: 1 vs 8 devices
(float32 drift only), resume after a normal stop and after kill -9 (bitwise), and a
checkpoint of another model refused with the workdir kept."""

import shutil
import subprocess
import time

import pytest

from training_runs import (REPO, COMPARED_RUN, cli_env, cli_command, train_run, saved_steps,
                           saved_state, assert_bitwise_equal, assert_same_training)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, data_root, compile_cache):
  """Six uninterrupted steps on 8 devices, optimizer state sharded over them (FSDP-style)."""
  workdir = tmp_path_factory.mktemp('reference')
  train_run(workdir, data_root, compile_cache, '--config.train.shard_optimizer_state=True',
            devices=8)
  return workdir


@pytest.fixture(scope='module')
def three_steps_on_8_devices(tmp_path_factory, data_root, compile_cache):
  """The reference run stopped after three steps (a checkpoint after each)."""
  workdir = tmp_path_factory.mktemp('three_steps')
  train_run(workdir, data_root, compile_cache, *COMPARED_RUN,
            '--config.train.shard_optimizer_state=True', devices=8)
  return workdir


def test_one_and_eight_devices_train_alike(tmp_path, data_root, compile_cache,
                                           three_steps_on_8_devices, initial_params):
  train_run(tmp_path, data_root, compile_cache, *COMPARED_RUN, devices=1)
  assert_same_training(tmp_path, three_steps_on_8_devices, initial_params)


def test_resume_after_a_normal_stop_is_bitwise_identical(tmp_path, data_root, compile_cache,
                                                         three_steps_on_8_devices, reference_run):
  workdir = tmp_path / 'run'
  shutil.copytree(three_steps_on_8_devices, workdir)
  resumed = train_run(workdir, data_root, compile_cache,
                      '--config.train.shard_optimizer_state=True', devices=8)
  assert 'at step 3' in resumed.stderr
  assert saved_steps(workdir) == [2, 3, 6]
  assert_bitwise_equal(saved_state(workdir), saved_state(reference_run))


def test_resume_after_kill_9_is_bitwise_identical(tmp_path, data_root, compile_cache,
                                                  reference_run):
  flags = ('--config.train.shard_optimizer_state=True', '--config.train.checkpoint_every=1',
           '--config.train.num_steps=1000')
  process = subprocess.Popen(cli_command(tmp_path, data_root, *flags),
                             env=cli_env(8, compile_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=REPO)
  deadline = time.monotonic() + 600
  while not any(s >= 2 for s in saved_steps(tmp_path)) and time.monotonic() < deadline:
    time.sleep(0.05)
  process.kill()  # SIGKILL, likely in the middle of the next save
  process.wait()
  assert 2 <= saved_steps(tmp_path)[-1] < 6
  # A save cut short leaves a temporary folder: it must be ignored, never restored.
  (tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp-1234').mkdir(exist_ok=True)
  train_run(tmp_path, data_root, compile_cache, '--config.train.shard_optimizer_state=True',
            devices=8)
  assert_bitwise_equal(saved_state(tmp_path, 6), saved_state(reference_run))


def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, data_root, compile_cache,
                                                           reference_run):
  workdir = tmp_path / 'run'
  shutil.copytree(reference_run, workdir)
  before = sorted((p.relative_to(workdir), p.stat().st_size) for p in workdir.rglob('*'))
  result = train_run(workdir, data_root, compile_cache, '--config.model.num_features=12',
                     '--config.train.shard_optimizer_state=True', devices=8, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'of a different model or optimizer' in result.stderr
  assert str(workdir / 'checkpoints' / '6') in result.stderr
  assert sorted((p.relative_to(workdir), p.stat().st_size) for p in workdir.rglob('*')) == before


