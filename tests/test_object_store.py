"""A workdir and data in a bucket: fsmnet-train killed with SIGKILL and resumed bit for bit,
fsmnet-eval reading it and writing its report there, every data layout, prepared shards and
fsmnet-reconstruct's scans read from a bucket as from local files, and a bucket that cannot be
written refused before any work. The store is a real one served on this machine
(scripts/gcs_emulator.py): gcp-storage-emulator's Google Cloud Storage JSON API, which gcsfs
(epath's gs:// backend), tensorstore (orbax's arrays) and array_record all speak."""

import importlib.util
import json
import random
import subprocess
import sys
import time

import fsspec
import h5py
import jax
import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax import checkpoint
from fsmnet_jax.checkpoint import save_variables
from fsmnet_jax.cli import reconstruct as reconstruct_cli
from fsmnet_jax.configs import tiny
from fsmnet_jax.data import DataError, pipeline
from fsmnet_jax.data.demo import LAYOUT_SETTINGS
from fsmnet_jax.files import as_path, local_copy, upload
from fsmnet_jax.model import FSMNet, init_variables
from training_runs import (REPO, SPATIAL_ONLY, assert_bitwise_equal, cli_command, cli_env,
                           free_port, saved_state, train_run)

# gcsfs is imported by the first gs:// path, once the fixture below has set its environment.
if importlib.util.find_spec('gcsfs') is None:
  pytest.skip('gs:// needs gcsfs (the dev extra installs it)', allow_module_level=True)
pytest.importorskip('gcp_storage_emulator')
_spec = importlib.util.spec_from_file_location('gcs_emulator', REPO / 'scripts/gcs_emulator.py')
gcs_emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gcs_emulator)

BUCKET = 'fsmnet-test'


@pytest.fixture(scope='module')
def store_env():
  """The environment that points this process and the commands at a store served here."""
  server, url = gcs_emulator.start(BUCKET)
  env = gcs_emulator.client_environment(url)
  try:
    with pytest.MonkeyPatch.context() as patch:
      for name, value in env.items():
        patch.setenv(name, value)
      # fsspec read FSSPEC_GCS from the environment when it was imported.
      patch.setitem(fsspec.config.conf, 'gcs', json.loads(env['FSSPEC_GCS']))
      yield env
  finally:
    server.terminate()
    server.wait()


def _bucket_run(workdir, data_root, cache, env, *overrides, **kwargs):
  return subprocess.run(cli_command(workdir, data_root, *overrides, **kwargs),
                        env={**cli_env(1, cache), **env}, capture_output=True, text=True,
                        timeout=900, cwd=REPO)


@pytest.fixture(scope='module')
def bucket_data(data_root, store_env):
  """The demo data (every layout) copied into the bucket; its URL."""
  url = f'gs://{BUCKET}/data'
  upload(data_root, as_path(url))
  return url


@pytest.mark.parametrize('layout', ['nifti_pairs', 'ixi_t1', 'fastmri', 'fastmri_multicoil',
                                    'm4raw'])
def test_a_data_set_in_a_bucket_gives_the_slices_of_its_files(tmp_path, data_root, bucket_data,
                                                              layout):
  sources = []
  for root in (str(data_root), bucket_data):
    config = tiny.get_config()
    config.data.update({key: f'{root}/{value}' if key.endswith(('root', 'pairs')) else value
                        for key, value in LAYOUT_SETTINGS[layout].items()})
    config.data.cache_dir = str(tmp_path / 'cache')
    sources.append(pipeline.make_source(config, 'train'))
  local, remote = sources
  assert repr(remote) == repr(local) and len(local) > 1
  for index in (0, len(local) - 1):
    expected, read = local[index], remote[index]
    assert sorted(read) == sorted(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(read[key], value, err_msg=key)


def test_a_run_in_a_bucket_killed_and_resumed_is_the_local_run(tmp_path, data_root, bucket_data,
                                                                compile_cache, store_env):
  """Its data too (the demo's BraTS layout; the split written there), and the run equals the
  run of the local files."""
  local = tmp_path / 'local'
  train_run(local, data_root, compile_cache)  # six steps, uninterrupted
  in_bucket = (f'--config.data.root={bucket_data}',
               f'--config.data.split_file={bucket_data}/split.json')
  workdir = f'gs://{BUCKET}/runs/tiny'
  steps = as_path(workdir) / checkpoint.TRAIN_CHECKPOINT_DIR
  log = tmp_path / 'killed.txt'
  with open(log, 'w') as stderr:
    process = subprocess.Popen(
        cli_command(workdir, data_root, *in_bucket, '--config.train.checkpoint_every=1',
                    '--config.train.num_steps=1000'),
        env={**cli_env(1, compile_cache), **store_env}, stdout=subprocess.DEVNULL,
        stderr=stderr, cwd=REPO)
  deadline = time.monotonic() + 600
  while not (steps / '2' / 'commit_success.txt').exists():
    assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
    time.sleep(0.1)
  time.sleep(random.Random(0).uniform(0, 1))
  process.kill()
  assert process.wait() == -9
  killed_at = int(checkpoint.latest_train_step(workdir).name)
  assert 2 <= killed_at < 6

  resumed = _bucket_run(workdir, data_root, compile_cache, store_env, *in_bucket)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from {steps} at step {killed_at}' in resumed.stderr
  assert 'Traceback' not in resumed.stderr
  assert checkpoint.latest_train_step(workdir).name == '6'
  assert_bitwise_equal(saved_state(workdir, 6), saved_state(local, 6))
  # What the run logged, in the bucket: metrics of every step (those after the last checkpoint
  # the killed start made again), its config and TensorBoard's events.
  logged = [json.loads(line) for line in (as_path(workdir) / 'metrics.jsonl').read_text()
            .splitlines()]
  assert {m['step'] for m in logged if 'train_loss' in m} == set(range(1, 7))
  assert json.loads((as_path(workdir) / 'config.json').read_text())['data']['root'] == (
      bucket_data)
  split = json.loads(as_path(f'{bucket_data}/split.json').read_text())
  assert len(split['train']) == 3 and len(split['test']) == 1
  assert list((as_path(workdir) / 'tensorboard').glob('events.out.tfevents.*'))

  # fsmnet-eval reads the bucket's latest step and writes its report beside it, as it does
  # for the local run.
  evaluate = [sys.executable, '-m', 'fsmnet_jax.cli.eval', '--config',
              str(REPO / 'configs/tiny.py'), f'--config.data.root={data_root}',
              '--config.eval.batch_size=8', *SPATIAL_ONLY, '--num_panels=1']
  for run in (workdir, local):
    done = subprocess.run([*evaluate, f'--checkpoint={run}'], capture_output=True, text=True,
                          env={**cli_env(1, compile_cache), **store_env}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
  reports = [json.loads((as_path(run) / 'eval_test' / 'metrics.json').read_text())
             for run in (workdir, local)]
  assert reports[0].pop('checkpoint') == workdir
  reports[1].pop('checkpoint')
  assert reports[0] == reports[1]
  assert (as_path(workdir) / 'eval_test' / 'panels').is_dir()


@pytest.mark.parametrize('where, reason', [
    ('gs://no-such-bucket/run', 'FileNotFoundError'),  # the store answers 404
    ('unreachable', 'Connect call failed'),
])
def test_a_bucket_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, data_root, compile_cache, store_env, where, reason):
  env = dict(store_env)
  if where == 'unreachable':
    where = f'gs://{BUCKET}/run'
    env['STORAGE_EMULATOR_HOST'] = f'http://127.0.0.1:{free_port()}'  # nobody listens
  started = time.monotonic()
  result = _bucket_run(where, data_root, compile_cache, env)
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(f'fsmnet-train: error: --workdir {where}: cannot write checkpoints '
                         f'there (') and reason in line, line
  assert time.monotonic() - started < 60


def test_scans_in_a_bucket_are_reconstructed_into_it_as_local_ones(tmp_path, capsys, data_root,
                                                                   bucket_data):
  """fsmnet-reconstruct with its inputs and outputs URLs: NIfTI and k-space."""
  weights = save_variables(init_variables(FSMNet(**tiny.get_config().model), jax.random.key(1)),
                           tmp_path / 'weights')
  common = ['--checkpoint', str(weights), '--config', str(REPO / 'configs/tiny.py'),
            '--acceleration', '4']
  subject = 'brats/DemoBraTS_000/DemoBraTS_000'
  written = []
  for root, out in ((data_root, tmp_path), (bucket_data, f'gs://{BUCKET}/reconstructed')):
    for inputs, name in (([f'--t1={root}/{subject}_t1.nii.gz', f'--t2={root}/{subject}_t2.nii.gz'],
                          'brain.nii.gz'),
                         ([f'--kspace={root}/fastmri/file_demo0001.h5',
                           f'--reference={root}/fastmri/file_demo0000.h5'], 'knee.h5')):
      assert reconstruct_cli.main([*common, *inputs, f'--out={out}/{name}']) == 0
    outputs = {}
    for name in ('brain.nii.gz', 'brain_mask.npy', 'knee.h5', 'knee_mask.npy'):
      with local_copy(as_path(f'{out}/{name}')) as local:
        if name.endswith('.npy'):
          outputs[name] = np.load(local)
        elif name.endswith('.h5'):
          with h5py.File(local) as f:
            outputs[name] = f['reconstruction'][()]
        else:
          outputs[name] = nib.load(local).get_fdata()
    written.append(outputs)
  for name, value in written[0].items():
    np.testing.assert_array_equal(written[1][name], value, err_msg=name)
  capsys.readouterr()
  missing = f'{bucket_data}/{subject}_t1_missing.nii.gz'
  assert reconstruct_cli.main([*common, f'--t1={missing}', f'--t2={bucket_data}/{subject}'
                               '_t2.nii.gz', f'--out={tmp_path}/other.nii.gz']) == 2
  assert capsys.readouterr().err.strip() == (
      f'fsmnet-reconstruct: error: {missing}: no such file')


def test_shards_prepared_into_a_bucket_read_as_those_prepared_locally(tmp_path, data_root,
                                                                     store_env):
  """fsmnet-prepare-data --out gs://...; an existing URL is refused, a truncated shard in the
  bucket named, and a store array_record cannot read refused by name."""
  url = f'gs://{BUCKET}/prepared'
  command = [sys.executable, '-m', 'fsmnet_jax.cli.prepare_data',
             '--config', str(REPO / 'configs/tiny.py'), f'--config.data.root={data_root}/brats',
             '--config.data.dataset=brats', f'--config.data.cache_dir={tmp_path / "cache"}']
  for out in (url, tmp_path / 'local'):
    done = subprocess.run([*command, f'--out={out}'], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'wrote {out}: ' in done.stdout
  sources = []
  for root in (tmp_path / 'local', url):
    config = tiny.get_config()
    config.data.update(dataset='prepared', root=str(root))
    sources.append(pipeline.make_source(config, 'train'))
  local, remote = sources
  assert repr(remote) == repr(local) and len(local) == 18
  for index in range(len(local)):
    for key, value in local[index].items():
      if key == 'record':
        assert remote[index][key] == value
      else:
        np.testing.assert_array_equal(remote[index][key], value, err_msg=key)

  refused = subprocess.run([*command, f'--out={url}'], capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      f'fsmnet-prepare-data: error: {url}: already exists; pass --overwrite to replace it')

  damaged = f'gs://{BUCKET}/damaged'
  upload(tmp_path / 'local', as_path(damaged))
  shard = as_path(damaged) / 'train-00000.array_record'
  whole = shard.read_bytes()
  shard.write_bytes(whole[:len(whole) // 2])
  config.data.root = damaged
  with pytest.raises(DataError, match=f'^{shard}: '):
    pipeline.make_source(config, 'train')

  config.data.root = 's3://fsmnet-test/prepared'
  with pytest.raises(DataError, match=r'^s3://fsmnet-test/prepared: prepared shards are read '
                                      r'from local paths and gs:// only'):
    pipeline.make_source(config, 'train')
