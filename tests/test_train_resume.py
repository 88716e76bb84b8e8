"""fsmnet-train's runs are one computation however they are stopped or spread: resume after a
normal stop and after kill -9 (bitwise, optimizer state sharded over 8 devices), a full disk
stopping the run with its last checkpoint intact, a checkpoint of another model refused with
the workdir kept, two processes of 4 devices each training as one process of 8, and a run
from prepared shards (fsmnet-prepare-data) training as the run from the files. (1 vs 2 devices
on the whole model: test_train.py.)"""

import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_runs import (REPO, TINY, COMPARED_RUN, free_port, cli_env, cli_command, train_run,
                           saved_steps, saved_state, assert_bitwise_equal, assert_same_training)


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


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


def test_a_full_disk_then_a_resume_after_a_normal_stop_is_bitwise_identical(
    tmp_path, data_root, compile_cache, three_steps_on_8_devices, reference_run):
  workdir = tmp_path / 'run'
  shutil.copytree(three_steps_on_8_devices, workdir)
  checkpoints = workdir / 'checkpoints'
  before = {step: _files(checkpoints / str(step)) for step in saved_steps(workdir)}
  flags = ('--config.train.shard_optimizer_state=True', '--config.train.checkpoint_every=1')
  # A file size limit below the ~1.2 MB of a save's largest file: the writes of the step 4
  # checkpoint fail as on a full disk (EFBIG here, ENOSPC there: the same OSError path).
  limit = 500_000
  full = subprocess.run(
      cli_command(workdir, data_root, *flags), env=cli_env(8, compile_cache), cwd=REPO,
      capture_output=True, text=True, timeout=900,
      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
  assert full.returncode == 1, full.stderr[-3000:]
  assert full.stderr.strip().splitlines()[-1] == (
      f'fsmnet-train: error: {checkpoints}: could not write the checkpoint of step 4 '
      f'([Errno 27] File too large); the latest complete checkpoint, step 3, is intact')
  assert 'Traceback' not in full.stderr
  assert {step: _files(checkpoints / str(step)) for step in saved_steps(workdir)} == before

  resumed = train_run(workdir, data_root, compile_cache, *flags[:1], devices=8)
  assert 'at step 3' in resumed.stderr
  assert saved_steps(workdir) == [2, 3, 6]
  assert_bitwise_equal(saved_state(workdir), saved_state(reference_run))
  # A resume with other settings keeps the first start's config and adds its own.
  started, resumed = (json.loads((workdir / name).read_text())
                      for name in ('config.json', 'config.step_3.json'))
  assert (started['train']['num_steps'], resumed['train']['num_steps']) == (3, 6)


def _wait_for(condition, what: str, timeout: float = 600) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise TimeoutError(f'gave up waiting for {what}')
    time.sleep(0.02)


def test_kill_9_anywhere_resumes_bitwise_identically(tmp_path, data_root, compile_cache,
                                                     reference_run):
  """Five kill -9s: twice just after a step hands its checkpoint to the asynchronous saver
  (the save, ~2 s here, is cut short), three times at a random moment after a checkpoint
  completed (in a step, or in the next save). After each, every complete checkpoint loads;
  the last restart runs to the end and equals the uninterrupted run bit for bit."""
  rng = random.Random(0)
  flags = ('--config.train.shard_optimizer_state=True', '--config.train.checkpoint_every=1',
           '--config.train.num_steps=1000')
  checkpoints = tmp_path / 'checkpoints'
  cut_saves = 0
  for kill in range(5):
    log = tmp_path / f'log_{kill}.txt'
    complete = saved_steps(tmp_path)
    next_step = (complete[-1] if complete else 0) + 1
    with open(log, 'w') as stderr:
      process = subprocess.Popen(cli_command(tmp_path, data_root, *flags),
                                 env=cli_env(8, compile_cache), stdout=subprocess.DEVNULL,
                                 stderr=stderr, cwd=REPO)
    # Every start but the last stops before checkpoint 6 completes, whatever the machine's
    # speed: the last one trains to the end.
    if kill in (0, 3) or next_step == 6:  # during the save of the first step this start trains
      _wait_for(lambda: f'step {next_step}: train' in log.read_text(),
                f'step {next_step} in {log}')
      time.sleep(rng.uniform(0, 0.2))
    else:  # anywhere after the first checkpoint this start completes, up to checkpoint 5
      _wait_for(lambda: next_step in saved_steps(tmp_path), f'checkpoint {next_step}')
      deadline = time.monotonic() + rng.uniform(0, 3)
      while time.monotonic() < deadline and saved_steps(tmp_path)[-1] < 5:
        time.sleep(0.02)
    process.kill()
    assert process.wait() == -9, log.read_text()[-3000:]
    if complete:  # this start resumed from the last complete checkpoint
      assert f'checkpoints at step {complete[-1]}' in log.read_text(), log.read_text()[-3000:]
    cut_saves += any(not p.name.isdigit() for p in checkpoints.iterdir())
    for step in saved_steps(tmp_path):
      assert 'params' in saved_state(tmp_path, step), step
  # Measured: all five cut a save short (on 8 CPU devices a save takes ~2 of every 2.5 s).
  assert cut_saves >= 2
  assert saved_steps(tmp_path)[-1] < 6
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




def test_a_run_from_prepared_shards_is_the_run_from_the_files(tmp_path, data_root,
                                                              compile_cache, reference_run):
  shards = tmp_path / 'shards'
  prepared = subprocess.run([sys.executable, '-m', 'fsmnet_jax.cli.prepare_data', '--config',
                             str(REPO / 'configs/tiny.py'), f'--config.data.root={data_root}',
                             *TINY, f'--out={shards}'], capture_output=True, text=True,
                            timeout=300)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  workdir = tmp_path / 'run'
  train_run(workdir, shards, compile_cache, '--config.data.dataset=prepared',
            '--config.train.shard_optimizer_state=True', devices=8)
  assert_bitwise_equal(saved_state(workdir), saved_state(reference_run))
  logged = [(workdir / 'metrics.jsonl').read_text(), (reference_run / 'metrics.jsonl').read_text()]
  losses, evaluations = ([{m['step']: m[key] for m in map(json.loads, text.splitlines())
                           if key in m} for text in logged] for key in ('train_loss', 'eval_psnr'))
  assert losses[0] == losses[1] and len(losses[0]) == 6
  assert evaluations[0] == evaluations[1] and evaluations[0]


def test_two_processes_train_as_one(tmp_path, data_root, compile_cache, three_steps_on_8_devices):
  port = free_port()
  processes = [
      subprocess.Popen(
          cli_command(tmp_path, data_root, *COMPARED_RUN,
                      '--config.train.shard_optimizer_state=True',
                      f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                      f'--process_id={i}'),
          env=cli_env(4, compile_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
          text=True, cwd=REPO)
      for i in range(2)]
  errors = [p.communicate(timeout=900)[1] for p in processes]
  for process, stderr in zip(processes, errors):
    assert process.returncode == 0, stderr[-3000:]
  assert 'process 1 of 2; 4 local and 8 global devices' in errors[1]
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / '3' / 'data').glob('*.json')) == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # Not bitwise: gloo sums the gradients in another order than one process does.
  assert_same_training(tmp_path, three_steps_on_8_devices)
