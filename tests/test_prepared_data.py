"""Prepared shards (fsmnet-prepare-data): every layout reads from them bit for bit as from its
files, and shards that do not fit the run are refused naming the file or the setting."""

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fsmnet_jax.cli.common import check_data_settings
from fsmnet_jax.configs import tiny
from fsmnet_jax.data import DataError, demo, pipeline, shards

LAYOUTS = ('brats', 'ixi_t1', 'fastmri', 'fastmri_multicoil', 'm4raw')


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('prepared') / 'data'
  demo.make_demo_data(root, seed=0, num_subjects=3, num_knee_pairs=2, image_size=32,
                      num_slices=6, num_ixi_subjects=3, num_multicoil_pairs=2,
                      num_m4raw_subjects=2)
  return root


def _config(root, layout, cache):
  config = tiny.get_config()
  config.data.update(demo.layout_settings(root, layout), cache_dir=str(cache))
  return config


def _prepared(config, folder):
  """`config` reading the shards in `folder`: where the files were is no longer said."""
  prepared = config.copy_and_resolve_references()
  prepared.data.update(dataset='prepared', root=str(folder),
                       **{key: '' for key in pipeline.PATH_SETTINGS})
  return prepared


def _assert_same_batches(config, other, split, batches):
  epochs = 1 if split == 'test' else None
  pairs = zip(pipeline.make_loader(config, split, 3, num_epochs=epochs),
              pipeline.make_loader(other, split, 3, num_epochs=epochs))
  count = 0
  for count, (batch, other_batch) in enumerate(pairs, 1):
    assert batch.keys() == other_batch.keys()
    for key, value in batch.items():
      assert value.dtype == other_batch[key].dtype and np.array_equal(value, other_batch[key]), key
    if count == batches:
      break
  assert count == (batches if split == 'train' else -(-len(pipeline.make_source(config, split))
                                                      // 3))


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_layout_reads_from_shards_bit_for_bit_as_from_its_files(demo_root, tmp_path,
                                                                      layout):
  config = _config(demo_root, layout, tmp_path / 'cache')
  # Shards of ~3 slices: the records of a batch come from several files.
  slice_bytes = len(shards.encode(pipeline.make_source(config, 'train')[0],
                                  layout not in ('brats', 'ixi_t1')))
  manifest = pipeline.prepare(config, tmp_path / 'shards', shard_bytes=3 * slice_bytes)
  assert len(manifest['splits']['train']['shards']) > 1
  prepared = _prepared(config, tmp_path / 'shards')
  for split in shards.SPLITS:
    _assert_same_batches(config, prepared, split, batches=8)
  source, files_source = (pipeline.make_source(c, 'test') for c in (prepared, config))
  assert [source.record(i) for i in range(len(source))] == [
      files_source.record(i) for i in range(len(files_source))]
  # grain hands sources to its worker processes pickled
  again = pickle.loads(pickle.dumps(source))
  assert np.array_equal(again[1]['target'], files_source[1]['target'])
  assert pipeline.underlying_dataset(prepared.data) == config.data.dataset
  check_data_settings(prepared)


@pytest.fixture(scope='module')
def brats_shards(demo_root, tmp_path_factory):
  folder = tmp_path_factory.mktemp('brats_shards') / 'shards'
  config = _config(demo_root, 'brats', folder.parent / 'cache')
  pipeline.prepare(config, folder, shard_bytes=2**16)
  return config, folder


def test_a_run_with_other_settings_is_refused_naming_them(brats_shards):
  config, folder = brats_shards
  other = _prepared(config, folder)
  other.data.image_size, other.seed = 64, 3  # the seed picks the test subjects
  with pytest.raises(DataError, match=r'config.data.image_size=64 \(prepared with 32\); '
                                      r'config.seed=3 \(prepared with 0\)'):
    pipeline.make_source(other, 'train')
  # Where the files were is not read from shards: said, it is refused (before any work, as
  # every data setting that is not read).
  located = _prepared(config, folder)
  located.data.split_file = 'runs/split.json'
  with pytest.raises(ValueError, match=r"config.data.split_file='runs/split.json' \(read by "
                                       r'.*from their files, not from prepared shards\)'):
    check_data_settings(located)
  # What is drawn as the data is read may change: the masks.
  masked = _prepared(config, folder)
  masked.data.update(acceleration=8, mask_type='equispaced')
  assert len(pipeline.make_source(masked, 'train')) == len(pipeline.make_source(config, 'train'))


def test_a_truncated_or_missing_shard_and_a_missing_manifest_are_named(brats_shards, tmp_path):
  config, folder = brats_shards
  copy = tmp_path / 'copy'
  copy.mkdir()
  for path in folder.iterdir():
    (copy / path.name).write_bytes(path.read_bytes())
  first = copy / 'train-00000.array_record'
  first.write_bytes(first.read_bytes()[:len(first.read_bytes()) // 2])
  with pytest.raises(DataError, match=f'{first}: '):
    pipeline.make_source(_prepared(config, copy), 'train')
  first.unlink()
  with pytest.raises(DataError, match=f'{first}: '):
    pipeline.make_source(_prepared(config, copy), 'train')
  with pytest.raises(DataError, match=f'{tmp_path}/prepared.json: no such file'):
    pipeline.make_source(_prepared(config, tmp_path), 'train')


def test_an_empty_folder_is_filled_in_place_and_left_empty_if_interrupted(brats_shards, tmp_path,
                                                                          monkeypatch):
  # A mount point (a container's volume, say) cannot be removed or renamed.
  config, folder = brats_shards
  volume = tmp_path / 'volume'
  volume.mkdir()
  for name in ('rmdir', 'rename', 'replace'):
    def busy(source, *args, original=getattr(os, name), **kwargs):
      if Path(source) == volume:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(volume))
      return original(source, *args, **kwargs)
    monkeypatch.setattr(os, name, busy)

  def interrupt(split, done, total):
    if split == 'test':
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    pipeline.prepare(config, volume, shard_bytes=2**16, progress=interrupt)
  assert not any(volume.iterdir())
  pipeline.prepare(config, volume, shard_bytes=2**16)
  assert {p.name: p.read_bytes() for p in volume.iterdir()} == {
      p.name: p.read_bytes() for p in folder.iterdir()}


def test_the_command_writes_new_folders_only(brats_shards, demo_root, tmp_path):
  config, folder = brats_shards
  command = [sys.executable, '-m', 'fsmnet_jax.cli.prepare_data',
             '--config', str(tiny.__file__), f'--config.data.root={demo_root}/brats',
             '--config.data.dataset=brats', f'--config.data.cache_dir={tmp_path / "cache"}']
  written = subprocess.run([*command, f'--out={tmp_path / "new"}'], capture_output=True,
                           text=True, timeout=300)
  assert written.returncode == 0, written.stderr
  assert 'train: 8 slices of 2 volumes in 1 shards' in written.stderr
  train = pipeline.make_source(_prepared(config, tmp_path / 'new'), 'train')
  assert len(train) == len(pipeline.make_source(config, 'train'))

  before = {p.name: p.read_bytes() for p in folder.iterdir()}
  refused = subprocess.run([*command, f'--out={folder}'], capture_output=True, text=True,
                           timeout=300)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines()[-1] == (
      f'fsmnet-prepare-data: error: {folder}: already exists; pass --overwrite to replace it')
  assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
