"""A workdir and data in a bucket: fsmnet-train killed with SIGKILL and resumed bit for bit,
fsmnet-eval reading it and writing its report there, every data layout, prepared shards and
fsmnet-reconstruct's scans read from a bucket as from local files, and a bucket that cannot be
written refused before any work. The stores are real ones served on this machine:
scripts/gcs_emulator.py (gcp-storage-emulator's Google Cloud Storage JSON API, which gcsfs,
tensorstore and array_record speak) for gs://, and moto's S3 server for s3:// (s3fs)."""

import importlib.util
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request

import fsspec
import grain.python as grain
import h5py
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax import checkpoint, files
from fsmnet_jax.checkpoint import save_variables
from fsmnet_jax.cli import reconstruct as reconstruct_cli
from fsmnet_jax.configs import tiny
from fsmnet_jax.data import DataError, pipeline
from fsmnet_jax.data.demo import LAYOUT_SETTINGS
from fsmnet_jax.files import as_path, local_copy, upload
from fsmnet_jax.model import FSMNet, init_variables
from training_runs import (REPO, SPATIAL_ONLY, assert_bitwise_equal, cli_command, cli_env,
                           free_port, saved_state, saved_steps, train_run)

# gcsfs and s3fs are imported by the first URL path, once the fixture below has set their
# environment.
for _module, _store in (('gcsfs', 'gs://'), ('s3fs', 's3://'), ('gcp_storage_emulator', 'gs://'),
                        ('moto', 's3://')):
  if importlib.util.find_spec(_module) is None:
    pytest.skip(f'{_store} needs {_module} (the dev extra installs it)', allow_module_level=True)
_spec = importlib.util.spec_from_file_location('gcs_emulator', REPO / 'scripts/gcs_emulator.py')
gcs_emulator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gcs_emulator)

BUCKET = 'fsmnet-test'


def _start_s3() -> tuple[subprocess.Popen, str, dict[str, str]]:
  """moto's S3 server with BUCKET: (its process, its URL, the clients' environment)."""
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  process = subprocess.Popen([sys.executable, '-m', 'moto.server', '-p', str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(urllib.request.Request(f'{url}/{BUCKET}', method='PUT'),
                             timeout=5).close()
      break
    except (urllib.error.URLError, ConnectionError):
      assert process.poll() is None and time.monotonic() < deadline, f'no S3 server on {url}'
      time.sleep(0.1)
  # s3fs keeps no directory listings (other processes write the bucket).
  return process, url, {'AWS_ENDPOINT_URL': url, 'AWS_ACCESS_KEY_ID': 'test',
                        'AWS_SECRET_ACCESS_KEY': 'test', 'AWS_DEFAULT_REGION': 'us-east-1',
                        'FSSPEC_S3': json.dumps({'use_listings_cache': False})}


@pytest.fixture(scope='module', params=['gs', 's3'])
def store(request):
  """'gs://fsmnet-test' or 's3://fsmnet-test', served here; this process and the commands
  given the environment `store.env` use it."""
  if request.param == 'gs':
    server, url = gcs_emulator.start(BUCKET)
    env = gcs_emulator.client_environment(url)
  else:
    server, url, env = _start_s3()
  try:
    with pytest.MonkeyPatch.context() as patch:
      for name, value in env.items():
        patch.setenv(name, value)
      # fsspec read FSSPEC_GCS and FSSPEC_S3 from the environment when it was imported.
      for variable, protocol in (('FSSPEC_GCS', 'gcs'), ('FSSPEC_S3', 's3')):
        if variable in env:
          patch.setitem(fsspec.config.conf, protocol, json.loads(env[variable]))
      yield _Store(f'{request.param}://{BUCKET}', env, url)
  finally:
    server.terminate()
    server.wait()


class _Store:
  def __init__(self, bucket: str, env: dict[str, str], url: str):
    self.bucket, self.env, self.url = bucket, env, url
    self.scheme = bucket.split('://')[0]


def _bucket_run(workdir, data_root, cache, env, *overrides, **kwargs):
  return subprocess.run(cli_command(workdir, data_root, *overrides, **kwargs),
                        env={**cli_env(1, cache), **env}, capture_output=True, text=True,
                        timeout=900, cwd=REPO)


@pytest.fixture(scope='module')
def bucket_data(data_root, store):
  """The demo data (every layout) copied into the bucket; its URL."""
  url = f'{store.bucket}/data'
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


_EVALUATE = [sys.executable, '-m', 'fsmnet_jax.cli.eval', '--config',
             str(REPO / 'configs/tiny.py'), '--config.eval.batch_size=8', *SPATIAL_ONLY,
             '--num_panels=1']


@pytest.fixture(scope='module')
def local_run(tmp_path_factory, data_root, compile_cache):
  """Six steps on the local files, uninterrupted, and fsmnet-eval's report of them: the folder."""
  local = tmp_path_factory.mktemp('local') / 'run'
  train_run(local, data_root, compile_cache)
  subprocess.run([*_EVALUATE, f'--config.data.root={data_root}', f'--checkpoint={local}'],
                 check=True, capture_output=True, env=cli_env(1, compile_cache), timeout=600)
  return local


def test_a_run_in_a_bucket_killed_and_resumed_is_the_local_run(tmp_path, data_root, bucket_data,
                                                                compile_cache, store, local_run):
  """Its data too (the demo's BraTS layout; the split written there), and the run equals the
  run of the local files."""
  in_bucket = (f'--config.data.root={bucket_data}',
               f'--config.data.split_file={bucket_data}/split.json')
  workdir = f'{store.bucket}/runs/tiny'
  steps = as_path(workdir) / checkpoint.TRAIN_CHECKPOINT_DIR
  log = tmp_path / 'killed.txt'
  with open(log, 'w') as stderr:
    process = subprocess.Popen(
        cli_command(workdir, data_root, *in_bucket, '--config.train.checkpoint_every=1',
                    '--config.train.num_steps=1000'),
        env={**cli_env(1, compile_cache), **store.env}, stdout=subprocess.DEVNULL,
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

  resumed = _bucket_run(workdir, data_root, compile_cache, store.env, *in_bucket)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from {steps} at step {killed_at}' in resumed.stderr
  assert 'Traceback' not in resumed.stderr
  assert checkpoint.latest_train_step(workdir).name == '6'
  # The latest three (config.train.keep_checkpoints) of the killed run's complete steps and
  # the last: those dropped, and any step cut short, are gone from the bucket.
  assert saved_steps(workdir) == [*range(1, killed_at + 1), 6][-3:]
  assert_bitwise_equal(saved_state(workdir, 6), saved_state(local_run, 6))
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
  done = subprocess.run([*_EVALUATE, f'--config.data.root={data_root}', f'--checkpoint={workdir}'],
                        capture_output=True, text=True,
                        env={**cli_env(1, compile_cache), **store.env}, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  reports = [json.loads((as_path(run) / 'eval_test' / 'metrics.json').read_text())
             for run in (workdir, local_run)]
  assert reports[0].pop('checkpoint') == workdir
  reports[1].pop('checkpoint')
  assert reports[0] == reports[1]
  assert (as_path(workdir) / 'eval_test' / 'panels').is_dir()


class _Killed(BaseException):
  """What a SIGKILL does to a process, raised where the test chooses."""


@pytest.mark.parametrize('store', ['s3'], indirect=True)  # orbax writes gs:// itself
def test_checkpoints_in_a_store_orbax_cannot_write_are_uploaded_whole_or_never_restored(
    store, monkeypatch):
  """Orbax saves locally and each step is uploaded, its commit mark last: a process killed in
  the middle of an upload leaves a step that the next start neither restores nor keeps; steps
  the preservation policy drops leave the bucket. Several processes are refused."""
  directory = f'{store.bucket}/staged/checkpoints'
  data = iter(grain.MapDataset.range(10).to_iter_dataset())

  def save(checkpoints, step):
    next(data)
    checkpoints.save(step, {'w': jnp.full(3, float(step))}, data)

  checkpoints = checkpoint.TrainCheckpoints(directory, keep=2, best_metric='eval_psnr')
  for step in (1, 2, 3):
    save(checkpoints, step)
  assert saved_steps(directory.removesuffix('/checkpoints')) == [2, 3]

  copied = []
  def copy_then_die(source, target):
    if len(copied) == 2:
      raise _Killed
    copied.append(target)
    real_copy(source, target)
  real_copy = files._copy  # pylint: disable=protected-access
  monkeypatch.setattr(files, '_copy', copy_then_die)
  with pytest.raises(_Killed):
    save(checkpoints, 4)
  monkeypatch.undo()
  assert saved_steps(directory.removesuffix('/checkpoints')) == [2, 3, 4]  # 4 in part
  assert checkpoint.latest_train_step(directory.removesuffix('/checkpoints')).name == '3'

  resumed = checkpoint.TrainCheckpoints(directory, keep=2, best_metric='eval_psnr')
  assert resumed.latest_step() == 3
  state, _ = resumed.restore(3, {'w': jnp.zeros(3)},
                             iter(grain.MapDataset.range(10).to_iter_dataset()))
  np.testing.assert_array_equal(state['w'], np.full(3, 3.0))
  save(resumed, 4)
  resumed.close()
  assert saved_steps(directory.removesuffix('/checkpoints')) == [3, 4]

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(checkpoint.CheckpointError, match=f'^{directory}: orbax cannot write this '
                     'store, and checkpoints staged on each of 2 hosts would not make one'):
    checkpoint.TrainCheckpoints(directory, keep=2, best_metric='eval_psnr')


@pytest.mark.parametrize('store, problem', [
    ('gs', 'no such bucket'), ('gs', 'no credentials'),
    ('s3', 'no such bucket'), ('s3', 'no credentials'),
    ('s3', 'unreachable'),  # gcsfs retries an unreachable endpoint for ~36 s, boto for ~8 s
], indirect=['store'])
def test_a_bucket_that_cannot_be_written_is_refused_before_any_work(
    tmp_path, data_root, compile_cache, store, problem, monkeypatch):
  env = dict(store.env)
  reason = {('no such bucket', 'gs'): 'FileNotFoundError',  # the store answers 404
            ('no such bucket', 's3'): 'The specified bucket does not exist',
            ('unreachable', 's3'): 'Could not connect to the endpoint URL',
            ('no credentials', 'gs'): 'DefaultCredentialsError',
            ('no credentials', 's3'): 'NoCredentialsError'}[problem, store.scheme]
  bucket = f'{store.scheme}://no-such-bucket' if problem == 'no such bucket' else store.bucket
  where = f'{bucket}/run'
  if problem == 'unreachable':
    nobody = f'http://127.0.0.1:{free_port()}'
    env.update({name: nobody for name, value in store.env.items() if value == store.url})
  if problem == 'no credentials':  # none for either client, wherever it looks
    for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'GOOGLE_AUTH_TOKEN_FOR_TESTING'):
      monkeypatch.delenv(name, raising=False)
      env.pop(name, None)
    missing = str(tmp_path / 'missing')
    env.update(AWS_SHARED_CREDENTIALS_FILE=missing, AWS_CONFIG_FILE=missing,
               AWS_EC2_METADATA_DISABLED='true', GOOGLE_APPLICATION_CREDENTIALS=missing,
               FSSPEC_GCS=json.dumps({'token': 'google_default', 'use_listings_cache': False}))
  started = time.monotonic()
  result = _bucket_run(where, data_root, compile_cache, env)
  assert result.returncode == 2, result.stderr[-3000:]
  [line] = result.stderr.strip().splitlines()
  assert line.startswith(f'fsmnet-train: error: --workdir {where}: cannot write checkpoints '
                         f'there (') and reason in line, line
  assert time.monotonic() - started < 60


def test_scans_in_a_bucket_are_reconstructed_into_it_as_local_ones(tmp_path, capsys, monkeypatch,
                                                                   data_root, bucket_data, store):
  """fsmnet-reconstruct with its inputs and outputs URLs: NIfTI and k-space, each input
  downloaded once."""
  downloads = []
  download = files.download
  monkeypatch.setattr(files, 'download',
                      lambda remote, local: downloads.append(str(remote)) or download(remote, local))
  weights = save_variables(init_variables(FSMNet(**tiny.get_config().model), jax.random.key(1)),
                           tmp_path / 'weights')
  common = ['--checkpoint', str(weights), '--config', str(REPO / 'configs/tiny.py'),
            '--acceleration', '4']
  subject = 'brats/DemoBraTS_000/DemoBraTS_000'
  written = []
  for root, out in ((data_root, tmp_path), (bucket_data, f'{store.bucket}/reconstructed')):
    for inputs, name in (([f'--t1={root}/{subject}_t1.nii.gz', f'--t2={root}/{subject}_t2.nii.gz'],
                          'brain.nii.gz'),
                         ([f'--kspace={root}/fastmri/file_demo0001.h5',
                           f'--reference={root}/fastmri/file_demo0000.h5'], 'knee.h5')):
      downloads.clear()
      assert reconstruct_cli.main([*common, *inputs, f'--out={out}/{name}']) == 0
      assert sorted(downloads) == sorted(x.split('=', 1)[1] for x in inputs if '://' in x)
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


@pytest.mark.parametrize('store', ['gs'], indirect=True)  # array_record reads no other store
def test_shards_prepared_into_a_bucket_read_as_those_prepared_locally(tmp_path, data_root,
                                                                     store):
  """fsmnet-prepare-data --out gs://...; an existing URL is refused, a truncated shard in the
  bucket named, and a store array_record cannot read refused by name."""
  url = f'{store.bucket}/prepared'
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

  damaged = f'{store.bucket}/damaged'
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
