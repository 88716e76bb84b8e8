"""grain input pipelines: slices -> undersampled, normalised NHWC batches.

A batch is a dict of numpy arrays: `target_under`, `aux`, `target` (B, H, W, 1) float32,
`mask` (B, H, W) float32 (1 where k-space was measured), `mean`, `std` (B,) (the statistics
that map `target` back to intensities), `key` (B,) (the records' positions in the source:
`source.record(key)` says which subject and slice). Training masks are drawn per example from
grain's per-record generator (a function of the seed, the epoch and the position:
reproducible); test masks are fixed per volume, seeded from its file name as fastMRI does.
"""

import dataclasses
import logging
import threading
from pathlib import Path
from typing import Callable

from absl import flags
import grain.python as grain
import jax
import ml_collections
import numpy as np

from fsmnet_jax.data import (DataError, brats, fastmri, ixi, kspace, m4raw, masks, shards,
                             transforms, volumes)
from fsmnet_jax.files import as_path

DATASETS = ('demo', 'brats', 'ixi', 'nifti_pairs', 'fastmri', 'fastmri_multicoil', 'm4raw',
            'prepared')
MULTICOIL = ('fastmri_multicoil', 'm4raw')  # images: root-sum-of-squares of the coils'
# The name in a NIfTI source's repr, which grain compares when a run resumes: BraTS runs of
# before IXI keep resuming.
_SOURCE_NAMES = {'demo': 'BratsSlices', 'brats': 'BratsSlices', 'ixi': 'IxiSlices',
                 'nifti_pairs': 'NiftiPairSlices'}
NIFTI = tuple(_SOURCE_NAMES)
READ_THREADS = 16  # grain's default
KSPACE_PAIRS = ('fastmri', 'fastmri_multicoil')  # pairs listed in CSV files
# config.data settings that only some data sets read: set for another, they would do nothing.
SETTING_READERS = {
    **dict.fromkeys(('split_file', 'test_fraction', 'percentile', 'min_foreground',
                     'skip_bad_subjects'), NIFTI),
    **dict.fromkeys(('target_contrast', 'reference_contrast'), ('ixi', 'm4raw')),
    'sites': ('ixi',),
    'repetition': ('m4raw',),
    **dict.fromkeys(('target_glob', 'reference_glob'), ('nifti_pairs',)),
    **dict.fromkeys(('train_pairs', 'test_pairs'), KSPACE_PAIRS),
}
# Where the files are, not what they hold: a prepared copy is read with other paths or none.
PATH_SETTINGS = ('split_file', 'train_pairs', 'test_pairs')


@dataclasses.dataclass(frozen=True)
class SliceRecord:
  key: int  # position in the data source
  volume: str  # file name the fixed test mask is seeded from
  index: int  # slice in the volume
  subject: str  # the subject's name (its folder, IXI's prefix), or the fastMRI PDFS file's stem


class VolumeSlices(grain.RandomAccessDataSource):
  """Axial slices (the target, its reference as the auxiliary) of the NIfTI pairs of one split."""

  def __init__(self, subjects: list[volumes.VolumePair], image_size: int, percentile: float,
               min_foreground: float, align_by_headers: bool = False,
               skip_bad_subjects: bool = False, cache_dir: str | None = None,
               name: str = 'VolumeSlices'):  # in the repr: see _SOURCE_NAMES
    self._open_volumes, self._lock = {}, threading.Lock()
    self._records, skipped = [], []
    for subject in subjects:
      try:
        cached = volumes.cached_pair(subject, image_size, percentile, align_by_headers,
                                     cache_dir)
      except DataError as e:
        if not skip_bad_subjects:
          raise
        logging.warning('skipping subject %s: %s', subject.name, e)
        skipped.append(subject.name)
        continue
      self._records += [(cached.filename, subject, i) for i in volumes.covered_slices(
          cached[0], cached[1], min_foreground, align_by_headers)]
    if skipped:
      logging.warning('skipped %d of %d subjects with unusable data: %s', len(skipped),
                      len(subjects), ', '.join(skipped))
    if not self._records:
      raise DataError(f'no usable slices in {len(subjects)} subjects '
                      f'({subjects[0].target.parent.parent if subjects else "no subjects"})')
    self._description = (f'{name}({len(subjects)} subjects, {len(self._records)} slices, '
                         f'first {subjects[0].name if subjects else None}, size {image_size})')

  def __len__(self) -> int:
    return len(self._records)

  def record(self, i: int) -> SliceRecord:
    _, subject, index = self._records[i]
    return SliceRecord(i, subject.target.name, index, subject.name)

  def _volumes(self, cache_file: str) -> np.ndarray:
    # Each cached file is opened once: numpy parses .npy headers with ast.literal_eval, which
    # CPython 3.11 can fail ("AST constructor recursion depth mismatch") when grain's reader
    # threads run it at the same time.
    with self._lock:
      if cache_file not in self._open_volumes:
        self._open_volumes[cache_file] = np.load(cache_file, mmap_mode='r')
      return self._open_volumes[cache_file]

  def __getstate__(self) -> dict:  # grain sends sources to its worker processes
    return {**self.__dict__, '_open_volumes': {}, '_lock': None}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def __getitem__(self, i: int) -> dict:
    reference, target = self._volumes(self._records[i][0])[:, self._records[i][2]]
    return {'target': np.array(target), 'aux': np.array(reference),
            'kspace': kspace.fft2c(target),
            'record': self.record(i)}

  def __repr__(self) -> str:  # grain checks it when restoring an iterator's state
    return self._description


class KspaceSlices(grain.RandomAccessDataSource):
  """Slices of h5 k-space pairs (fastMRI's PD/PDFS, M4Raw's contrasts): the target's k-space
  and image, the reference's image; multi-coil images are the root-sum-of-squares of the
  coils'."""

  def __init__(self, pairs: list[fastmri.KspacePair], image_size: int, multicoil: bool,
               name: str):
    self._pairs, self._size, self._multicoil, self._name = pairs, image_size, multicoil, name
    for pair in pairs:
      for path in pair.reference + pair.target:
        recon = fastmri.read_header(path)['recon_size']
        if min(recon) < image_size:
          raise DataError(f'{path}: its reconstruction size {recon[0]}x{recon[1]} (ISMRMRD '
                          f'header) is smaller than config.data.image_size {image_size}')
    self._records = [(pair, index) for pair in pairs for index in range(pair.num_slices)]

  def __len__(self) -> int:
    return len(self._records)

  def record(self, i: int) -> SliceRecord:
    pair, index = self._records[i]
    return SliceRecord(i, pair.target[0].name, index, pair.subject)

  def __getitem__(self, i: int) -> dict:
    pair, index = self._records[i]
    target_kspace = fastmri.read_kspace(pair.target, index)
    image = lambda k: kspace.zero_filled(k, size=self._size, coils=self._multicoil)
    return {'target': image(target_kspace),
            'aux': image(fastmri.read_kspace(pair.reference, index)),
            'kspace': target_kspace, 'record': self.record(i)}

  def __repr__(self) -> str:
    coils = ', multi-coil' if self._multicoil else ''
    return (f'{self._name}({len(self._pairs)} pairs, {len(self._records)} slices, '
            f'size {self._size}{coils})')


class PreparedSlices(grain.RandomAccessDataSource):
  """The slices of one split that fsmnet-prepare-data wrote (`shards`), exactly as the source
  they were prepared from gives them."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    root = config.data.root
    manifest = shards.read_manifest(root)
    differences = shards.setting_differences(
        manifest['settings'], example_settings(config, manifest['dataset']))
    if differences:
      raise DataError(f'{root}: prepared from {manifest["dataset"]} with other settings than '
                      f'this run\'s: {"; ".join(differences)}. Run with those settings, or '
                      'prepare the data again with these')
    self._shards = shards.ShardReader(root, split, manifest)
    table = manifest['splits'][split]
    self._records = [(v['volume'], index, v['subject'])
                     for v in table['volumes'] for index in v['slices']]
    # The original source's: the same records, so a run may resume from either, and from
    # shards moved or mounted elsewhere.
    self._description = table['description']

  def __len__(self) -> int:
    return len(self._records)

  def record(self, i: int) -> SliceRecord:
    return SliceRecord(i, *self._records[i])

  def __getitem__(self, i: int) -> dict:
    example = self._shards[i]
    if 'kspace' not in example:  # a NIfTI data set's: the target's own, as VolumeSlices
      example['kspace'] = kspace.fft2c(example['target'])
    return {**example, 'record': self.record(i)}

  def __repr__(self) -> str:  # grain checks it when restoring an iterator's state
    return self._description


def example_settings(config: ml_collections.ConfigDict, dataset: str) -> dict:
  """The settings that decide which slices `dataset` gives and their pixels (not the masks,
  drawn as they are read), keyed as on the command line: a prepared copy records them."""
  data = config.data
  settings = {'data.image_size': data.image_size}
  settings.update({f'data.{key}': data[key] for key, readers in SETTING_READERS.items()
                   if dataset in readers and key not in PATH_SETTINGS})
  if dataset in NIFTI and not data.split_file:
    settings['seed'] = config.seed  # which subjects are test subjects
  return settings


def prepare(config: ml_collections.ConfigDict, out: str | Path,
            shard_bytes: int = shards.SHARD_BYTES, overwrite: bool = False,
            progress: Callable[[str, int, int], None] = lambda *_: None) -> dict:
  """Writes both splits of the configured data set, as `make_source` gives them, into `out`
  as prepared shards (`shards.write_prepared`); returns the manifest. `progress(split, done,
  total)` is called after each slice."""
  dataset = config.data.dataset
  if dataset == 'prepared':
    raise DataError(f'config.data.dataset=prepared: {config.data.root} is prepared already; '
                    'name the data set it holds and its original files')
  shards.refuse_existing_out(out, overwrite)  # before any decoding
  sources = {split: make_source(config, split) for split in shards.SPLITS}
  return shards.write_prepared(out, sources, dataset, example_settings(config, dataset),
                               {'seed': config.seed, 'data': config.data.to_dict()},
                               with_kspace=dataset not in NIFTI, shard_bytes=shard_bytes,
                               overwrite=overwrite, progress=progress)


def underlying_dataset(data: ml_collections.ConfigDict) -> str:
  """config.data.dataset, or for prepared data the data set it was prepared from."""
  return (shards.read_manifest(data.root)['dataset'] if data.dataset == 'prepared'
          else data.dataset)


class Undersample(grain.RandomMapTransform):
  """Masks the target's k-space, and normalises the zero-filled image, target and auxiliary.

  Training masks come from grain's per-record generator, a function of the sampler's seed and
  the record's position in the stream (so of the epoch too): reproducible for a given seed and
  process count. Test masks (`fixed_per_volume`) are seeded from the volume's file name, as
  fastMRI does, so every slice of a volume gets the same mask in every run.
  """

  def __init__(self, config: ml_collections.ConfigDict, fixed_per_volume: bool):
    self._config, self._fixed = config, fixed_per_volume

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    record = element['record']
    seed = tuple(map(ord, record.volume)) if self._fixed else int(rng.integers(2**31))
    coils = element['kspace'].ndim == 3  # (coils, rows, cols): one mask for every coil
    mask = masks.sampling_mask(self._config, element['kspace'].shape[-2:], seed)
    size = element['target'].shape[0]
    under = kspace.zero_filled(element['kspace'], mask, size, coils)
    example = transforms.normalize_example(under, element['target'], element['aux'])
    # On the image's own k-space grid: exact for BraTS; for fastMRI the measured k-space
    # cropped like the image; for multi-coil data the lines every coil measured.
    image_mask = transforms.fit_to_size(mask, size)
    return {**{k: example[k][..., None] for k in ('target_under', 'aux', 'target')},
            'mask': image_mask.astype(np.float32), 'mean': example['mean'], 'std': example['std'],
            'key': np.int64(record.key)}


def make_source(config: ml_collections.ConfigDict, split: str) -> grain.RandomAccessDataSource:
  """The slices of `split` ('train' or 'test') of the configured data set."""
  data = config.data
  root = as_path(data.root)
  if data.dataset == 'prepared':
    return PreparedSlices(config, split)
  if data.dataset in NIFTI:
    subjects, align_by_headers = volume_pairs(data)
    everyone = (ixi.subject_names(root, data.sites) if data.dataset == 'ixi'
                else [s.name for s in subjects])
    names = set(volumes.split_subjects(everyone, data.test_fraction, config.seed,
                                       data.split_file or None)[split])
    chosen = [s for s in subjects if s.name in names]
    return VolumeSlices(chosen, data.image_size, data.percentile, data.min_foreground,
                        align_by_headers, data.skip_bad_subjects, data.cache_dir or None,
                        _SOURCE_NAMES[data.dataset])
  if data.dataset in KSPACE_PAIRS:
    csv_file = data.get(f'{split}_pairs') or ''
    if not csv_file:
      raise DataError(f'config.data.{split}_pairs: name the CSV of PD/PDFS pairs for {split}')
    multicoil = data.dataset in MULTICOIL
    return KspaceSlices(fastmri.read_pairs(csv_file, root, multicoil), data.image_size,
                        multicoil, 'KneeSlices')
  if data.dataset == 'm4raw':
    return KspaceSlices(m4raw.find_pairs(root, split, data.target_contrast,
                                         data.reference_contrast, data.repetition),
                        data.image_size, True, 'M4RawSlices')
  raise DataError(f'config.data.dataset: unknown data set {data.dataset!r}; '
                  f'use one of {", ".join(DATASETS)}')


def unread_settings(data: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
                    ) -> list[str]:
  """The settings of `data` (config.data) changed from `defaults` that `data.dataset` does not
  read, each as 'config.data.KEY=VALUE (read by ...)'. Prepared shards read the settings of the
  data set they hold, but not where its files were."""
  dataset, prepared = underlying_dataset(data), data.dataset == 'prepared'
  return [f'config.data.{key}={data[key]!r} (read by {", ".join(readers)}'
          f'{" from their files, not from prepared shards" if prepared else ""})'
          for key, readers in SETTING_READERS.items()
          if (dataset not in readers or prepared and key in PATH_SETTINGS)
          and data[key] != defaults[key]]


def volume_pairs(data: ml_collections.ConfigDict) -> tuple[list[volumes.VolumePair], bool]:
  """The NIfTI pairs of a NIfTI data set, and whether a reference on another voxel grid than
  its target is aligned by the headers (IXI's T1; your own pairs) or refused (BraTS)."""
  root = as_path(data.root)
  if data.dataset == 'demo':
    return brats.find_subjects(root / 'brats'), False
  if data.dataset == 'brats':
    return brats.find_subjects(root), False
  if data.dataset == 'ixi':
    return ixi.find_subjects(root, data.target_contrast, data.reference_contrast,
                             data.sites), True
  if data.dataset == 'nifti_pairs':
    return volumes.find_glob_pairs(root, data.target_glob, data.reference_glob), True
  raise DataError(f'config.data.dataset={data.dataset!r}: not a NIfTI data set')


class GlobalBatchSampler:
  """Draws the record stream a single process would, and gives this process its contiguous
  slice of every global batch of `batch_size * process_count` records.

  So the global batches (records, order and masks, which are seeded by stream position) do not
  depend on how many processes share them, and a multi-host run trains on exactly the data
  of a one-process run; each process still reads only its own records.
  """

  def __init__(self, num_records: int, batch_size: int, process_index: int, process_count: int,
               shuffle: bool, num_epochs: int | None, seed: int):
    self._stream = grain.IndexSampler(num_records, grain.NoSharding(), shuffle=shuffle,
                                      num_epochs=num_epochs, seed=seed)
    self._batch_size, self._process_index = batch_size, process_index
    self._process_count = process_count
    global_batches = len(self._stream) // (batch_size * process_count)
    self._length = len(self._stream) if num_epochs is None else global_batches * batch_size

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._length:
      raise IndexError(f'index {index} out of range [0, {self._length})')
    batch, row = divmod(index, self._batch_size)
    stream_index = (batch * self._process_count + self._process_index) * self._batch_size + row
    record = self._stream[stream_index]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

  def __repr__(self) -> str:  # grain checks it when restoring an iterator's state
    return (f'GlobalBatchSampler({self._stream!r}, batch_size={self._batch_size}, '
            f'process {self._process_index} of {self._process_count})')


class RecordRangeSampler:
  """The records `records` (a range of keys) of the unshuffled one-epoch stream of all
  records, with their generators from that stream: a process's share of an evaluation, with
  the masks a one-process evaluation draws."""

  def __init__(self, num_records: int, records: range, seed: int):
    self._stream = grain.IndexSampler(num_records, grain.NoSharding(), shuffle=False,
                                      num_epochs=1, seed=seed)
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < len(self._records):
      raise IndexError(f'index {index} out of range [0, {len(self._records)})')
    record = self._stream[self._records[index]]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

  def __repr__(self) -> str:
    return f'RecordRangeSampler({self._stream!r}, records {self._records})'


def even_ranges(num_records: int, count: int) -> list[range]:
  """`count` consecutive ranges of record keys whose lengths differ by at most one."""
  cuts = [num_records * k // count for k in range(count + 1)]
  return [range(start, end) for start, end in zip(cuts, cuts[1:])]


def volume_ranges(source: grain.RandomAccessDataSource, count: int) -> list[range]:
  """`count` consecutive ranges of the source's record keys, of about equal length, cut only
  where one subject's slices end and the next one's begin (so each range holds whole volumes;
  a range may be empty)."""
  subjects = [source.record(i).subject for i in range(len(source))]
  boundaries = [i for i in range(1, len(subjects)) if subjects[i] != subjects[i - 1]]
  cuts = [0]
  for k in range(1, count):
    wanted = k * len(subjects) / count
    later = [b for b in boundaries if b > cuts[-1]]
    cuts.append(min(later, key=lambda b: abs(b - wanted)) if later else len(subjects))
  cuts.append(len(subjects))
  return [range(start, end) for start, end in zip(cuts, cuts[1:])]


def make_loader(config: ml_collections.ConfigDict, split: str, batch_size: int,
                num_epochs: int | None = None, shuffle: bool | None = None,
                source: grain.RandomAccessDataSource | None = None,
                records: range | None = None) -> grain.DataLoader:
  """A grain DataLoader of batches of `batch_size` (per process); each process reads its own
  records. The training split is read as training reads it (`GlobalBatchSampler`: global
  batches independent of the process count, full batches only), unless `records` is given;
  an evaluation reads one epoch of `records` in order (`RecordRangeSampler`; `shuffle` and
  `num_epochs` do not apply), by default this process's even share of the test split.
  `source` saves re-reading the split when the caller already has it."""
  source = make_source(config, split) if source is None else source
  training = split == 'train' and records is None
  if training:
    shuffle = True if shuffle is None else shuffle
    sampler = GlobalBatchSampler(len(source), batch_size, jax.process_index(),
                                 jax.process_count(), shuffle, num_epochs, config.seed)
  else:
    if records is None:
      records = even_ranges(len(source), jax.process_count())[jax.process_index()]
    sampler = RecordRangeSampler(len(source), records, config.seed)
  if config.data.worker_count and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside an absl app (a notebook, a test) they
    # have not been parsed, and the defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  operations = [Undersample(config.data, fixed_per_volume=split != 'train'),
                grain.Batch(batch_size, drop_remainder=training)]
  # grain reads up to 500 records ahead by default: 12 GB per process of 15-coil 640x320 knee
  # k-space (25 MB a record). A few batches ahead keep the reading threads as busy.
  read_options = grain.ReadOptions(num_threads=READ_THREADS,
                                   prefetch_buffer_size=max(READ_THREADS, 2 * batch_size))
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.data.worker_count,
                          shard_options=grain.NoSharding(),
                          read_options=read_options)
