"""grain pipelines on the demo data: batches, reproducibility, resume, sharding, fixed test
masks, how far ahead they read."""

import importlib.util
import itertools
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grain.python as grain
import numpy as np
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax.data import DataError, brats, masks, pipeline, volumes
from fsmnet_jax.data.demo import make_demo_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  make_demo_data(root, seed=0, num_subjects=4, num_knee_pairs=2, image_size=32, num_slices=8)
  config = tiny.get_config()
  config.data.root = str(root)
  config.data.cache_dir = str(tmp_path_factory.mktemp('cache'))
  return config


def _batches(loader, count):
  iterator = iter(loader)
  return iterator, [next(iterator) for _ in range(count)]


def test_batches(config):
  [batch] = _batches(pipeline.make_loader(config, 'train', batch_size=3), 1)[1]
  assert set(batch) == {'target_under', 'aux', 'target', 'mask', 'mean', 'std', 'key'}
  for key in ('target_under', 'aux', 'target'):
    assert batch[key].shape == (3, 32, 32, 1) and batch[key].dtype == np.float32
    assert np.abs(batch[key]).max() <= 6
  assert batch['mask'].shape == (3, 32, 32) and set(np.unique(batch['mask'])) == {0.0, 1.0}
  assert np.all(batch['mask'] == batch['mask'][:, :1, :])  # whole lines along W
  np.testing.assert_allclose(batch['mask'].mean(), 1 / config.data.acceleration, atol=0.1)
  assert batch['mean'].shape == batch['std'].shape == (3,)
  source = pipeline.make_source(config, 'train')
  # grain compares a source's repr when a run resumes its iterator: this one is frozen, so that
  # runs of earlier versions resume.
  assert repr(source) == (f'BratsSlices(3 subjects, {len(source)} slices, first DemoBraTS_000, '
                          'size 32)')
  for key in batch['key']:
    record = source.record(int(key))
    assert record.key == key and record.subject.startswith('DemoBraTS_')
    assert record.volume == f'{record.subject}_t2.nii.gz'


def test_reproducible_and_resumable(config):
  first = _batches(pipeline.make_loader(config, 'train', 2, num_epochs=2), 5)[1]
  iterator, again = _batches(pipeline.make_loader(config, 'train', 2, num_epochs=2), 3)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  state = iterator.get_state()
  resumed = iter(pipeline.make_loader(config, 'train', 2, num_epochs=2))
  resumed.set_state(state)
  for expected in first[3:]:
    actual = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(actual[key], expected[key])
  # Masks are drawn per example: two training batches do not share one mask.
  assert not np.array_equal(first[0]['mask'][0], first[0]['mask'][1]) or \
      not np.array_equal(first[1]['mask'][0], first[1]['mask'][1])


@pytest.mark.parametrize('split', ['test', 'train'])
def test_evaluation_shares_are_whole_volumes_read_as_one_process_reads_them(config, split):
  """What fsmnet-eval's processes read: consecutive whole volumes, the same batches (masks of
  the training split's random draws included) as one process reading everything."""
  source = pipeline.make_source(config, split)
  shares = pipeline.volume_ranges(source, 3)
  assert [key for share in shares for key in share] == list(range(len(source)))
  subjects = lambda share: {source.record(key).subject for key in share}
  assert all(not subjects(a) & subjects(b) for a, b in itertools.combinations(shares, 2))
  assert sum(1 for share in shares if share) == min(3, len(subjects(range(len(source)))))
  rows = lambda batches: {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
  everything = rows(list(pipeline.make_loader(config, split, 1, num_epochs=1, shuffle=False)))
  # Batches of 3: a share's last batch may be short, and is kept.
  shared = rows([batch for share in shares for batch in pipeline.make_loader(
      config, split, 3, source=source, records=share)])
  assert len(everything['key']) == len(source)
  for key, value in everything.items():
    np.testing.assert_array_equal(value, shared[key], err_msg=key)


def test_test_masks_are_fixed_per_volume(config):
  batches = list(pipeline.make_loader(config, 'test', 4, num_epochs=1))
  again = list(pipeline.make_loader(config, 'test', 4, num_epochs=1))
  masks = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(masks, np.concatenate([b['mask'] for b in again]))
  assert np.all(masks == masks[:1])  # one test subject: one volume, one mask for all slices


def test_fastmri_source_and_config_errors(config, tmp_path):
  knee = config.copy_and_resolve_references()
  knee.data.dataset = 'fastmri'
  knee.data.root = str(tmp_path.parent / 'x')
  with pytest.raises(DataError, match='config.data.train_pairs: name the CSV'):
    pipeline.make_source(knee, 'train')
  knee.data.root = config.data.root + '/fastmri'
  knee.data.train_pairs = config.data.root + '/fastmri/pairs.csv'
  knee.data.image_size = 24
  assert repr(pipeline.make_source(knee, 'train')) == 'KneeSlices(2 pairs, 16 slices, size 24)'
  [batch] = _batches(pipeline.make_loader(knee, 'train', 2), 1)[1]
  assert batch['target'].shape == (2, 24, 24, 1)
  knee.data.image_size = 48
  with pytest.raises(DataError, match=r'file_demo0000.h5: its reconstruction size 32x32'):
    pipeline.make_source(knee, 'train')
  knee.data.dataset = 'oasis'
  with pytest.raises(DataError, match="unknown data set 'oasis'"):
    pipeline.make_source(knee, 'train')


def test_mask_types_and_axes(config):
  columns = masks.sampling_mask(config.data, (32, 40), seed=1)
  assert columns.shape == (32, 40) and np.all(columns == columns[:1])
  rows_config = config.copy_and_resolve_references()
  rows_config.data.mask_axis = 0
  rows = masks.sampling_mask(rows_config.data, (32, 40), seed=1)
  assert np.all(rows == rows[:, :1])
  rows_config.data.mask_type = 'gaussian'
  [batch] = _batches(pipeline.make_loader(rows_config, 'train', 2), 1)[1]
  assert batch['mask'][0].sum() == round(32 * 32 / 4)
  assert not np.all(batch['mask'][0] == batch['mask'][0][:1])  # not whole lines
  rows_config.data.mask_type = 'poisson'
  poisson = masks.sampling_mask(rows_config.data, (32, 32), seed=1)
  assert abs(poisson.size / poisson.sum() / 4 - 1) < 0.05


def test_bad_subjects_stop_or_are_skipped(config, tmp_path, caplog):
  root = tmp_path / 'data'
  shutil.copytree(config.data.root, root)
  broken = root / 'brats' / 'DemoBraTS_000' / 'DemoBraTS_000_t2.nii.gz'
  broken.write_bytes(broken.read_bytes()[:300])
  bad = config.copy_and_resolve_references()
  bad.data.root = str(root)
  names = [s.name for s in brats.find_subjects(root / 'brats')]
  assignment = volumes.split_subjects(names, bad.data.test_fraction, bad.seed)
  split = 'train' if 'DemoBraTS_000' in assignment['train'] else 'test'
  with pytest.raises(DataError, match='DemoBraTS_000_t2.nii.gz: not a readable NIfTI'):
    pipeline.make_source(bad, split)
  bad.data.skip_bad_subjects = True
  source = pipeline.make_source(bad, split)
  assert len(source) > 0
  assert 'skipped 1 of' in caplog.text and 'DemoBraTS_000' in caplog.text


def test_worker_processes_are_deterministic_and_resumable(config):
  # grain forms each batch inside one worker, so batches depend on the worker count; for a
  # given count they are reproducible, and resumable.
  parallel = config.copy_and_resolve_references()
  parallel.data.worker_count = 2
  expected = _batches(pipeline.make_loader(parallel, 'train', 2, num_epochs=2), 6)[1]
  iterator, actual = _batches(pipeline.make_loader(parallel, 'train', 2, num_epochs=2), 3)
  state = iterator.get_state()
  resumed = iter(pipeline.make_loader(parallel, 'train', 2, num_epochs=2))
  resumed.set_state(state)
  actual += [next(resumed) for _ in range(3)]
  for a, b in zip(actual, expected):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_decoded_volumes_are_cached_outside_the_data(config, tmp_path):
  fresh = config.copy_and_resolve_references()
  fresh.data.cache_dir = str(tmp_path / 'cache')
  data_files = sorted(Path(config.data.root).rglob('*'))
  source = pipeline.make_source(fresh, 'train')
  cached = sorted((tmp_path / 'cache').iterdir())
  assert len(cached) == 3 and all(p.suffix == '.npy' for p in cached)  # the training subjects
  assert sorted(Path(config.data.root).rglob('*')) == data_files  # nothing written there
  example = source[0]
  assert example['target'].shape == example['aux'].shape == (32, 32)
  first_mtime = cached[0].stat().st_mtime_ns
  pipeline.make_source(fresh, 'train')
  assert cached[0].stat().st_mtime_ns == first_mtime  # reused, not decoded again


def test_global_batches_do_not_depend_on_the_process_count():
  one = pipeline.GlobalBatchSampler(50, 4, 0, 1, shuffle=True, num_epochs=None, seed=3)
  halves = [pipeline.GlobalBatchSampler(50, 2, p, 2, shuffle=True, num_epochs=None, seed=3)
            for p in range(2)]
  for batch in range(30):  # past the first epoch
    expected = [one[batch * 4 + row] for row in range(4)]
    got = [halves[p][batch * 2 + row] for p in range(2) for row in range(2)]
    assert [m.record_key for m in got] == [m.record_key for m in expected]
    assert [m.rng.integers(2**31) for m in got] == [m.rng.integers(2**31) for m in expected]
  finite = pipeline.GlobalBatchSampler(50, 2, 1, 2, shuffle=False, num_epochs=1, seed=3)
  assert len(finite) == 24  # 12 whole global batches of 4; the remainder is dropped
  with pytest.raises(IndexError):
    finite[24]


def test_brats_source_pickles_without_its_open_files(config):
  source = pipeline.make_source(config, 'train')
  first = source[0]
  clone = pickle.loads(pickle.dumps(source))
  assert len(pickle.dumps(source)) < 100_000  # no memory-mapped volumes inside
  np.testing.assert_array_equal(clone[0]['target'], first['target'])


def test_the_data_benchmark_measures_every_data_set():
  """From the files, from prepared shards, and from the files in a bucket (served here)."""
  bucket = () if importlib.util.find_spec('gcp_storage_emulator') is None else ('--bucket',)
  result = subprocess.run(
      [sys.executable, str(REPO / 'scripts/bench_data.py'), '--image-size', '32', '--slices', '4',
       '--batches', '2', '--workers', '0', *bucket], capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split('|')[1:-1] for line in result.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| data set')]
  datasets = set(pipeline.DATASETS) - {'demo', 'prepared'} | {'ixi_t1'}
  sources = ['files', 'shards'] + (['files in a bucket', 'shards in a bucket'] if bucket else [])
  assert {(row[0].strip(), row[2].strip()) for row in rows} == {
      (dataset, source) for dataset in datasets for source in sources}
  assert all(float(row[5].replace(',', '')) > 0 for row in rows)
  assert 'Traceback' not in result.stderr


class _CountingSource(grain.RandomAccessDataSource):
  """1000 blank records that count how many were read."""

  def __init__(self):
    self.reads = 0

  def __len__(self):
    return 1000

  def __getitem__(self, i):
    self.reads += 1
    image = np.zeros((32, 32), np.float32)
    return {'target': image, 'aux': image, 'kspace': np.zeros((32, 32), np.complex64),
            'record': pipeline.SliceRecord(i, 'volume', 0, 'subject')}


def test_the_loader_reads_a_few_batches_ahead_not_hundreds_of_records(config):
  """grain's default reads 500 records ahead: 12 GB of 15-coil knee k-space per process."""
  source = _CountingSource()
  iterator = iter(pipeline.make_loader(config, 'train', batch_size=2, source=source))
  next(iterator)
  time.sleep(1)  # the reading threads fill what they may
  # Measured: 18 (a buffer of 16 and the batch taken; reading threads in flight may add up to
  # 16); grain's default read 502.
  assert source.reads <= 2 * pipeline.READ_THREADS + 2
