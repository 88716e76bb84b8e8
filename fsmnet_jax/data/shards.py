"""Prepared data: a data set's ready slices in ArrayRecord shards (grain's random-access format).

`fsmnet-prepare-data` decodes a data set once (NIfTI volumes resampled and scaled, k-space read
from h5) and writes each split's slices as records of ArrayRecord files, beside `prepared.json`:
the settings the slices were made with, each shard's record count, and which volume and slice
each record is. `config.data.dataset='prepared'` reads them: a process reads the records of its
own batches (and each shard's index, to check it), and no host decodes a volume or writes a
cache. Undersampling stays in the
input pipeline, so one preparation serves every mask and acceleration.

A record holds the slice's `target` and `aux` images as float32, the values the pipeline
computes from the original files (so training from shards is bitwise training from the files),
and, for data sets that measure it, the target's k-space as read; NIfTI data sets' k-space is
the FFT of the target, computed again when read. ArrayRecord compresses each record with zstd.
"""

import concurrent.futures
import io
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from array_record.python import array_record_data_source, array_record_module
import numpy as np

from fsmnet_jax import files
from fsmnet_jax.data import DataError

MANIFEST = 'prepared.json'
FORMAT = 'fsmnet-prepared-1'
# One record per group: grain reads records at random. zstd level 3: the zeros around the
# anatomy shrink, at ~1 GB/s decompression.
WRITER_OPTIONS = 'group_size:1,zstd:3'
SHARD_BYTES = 512 * 2**20  # uncompressed, per shard: few files, and still many per data set
SPLITS = ('train', 'test')
STORED = ('target', 'aux', 'kspace')  # arrays a record may hold
_WRITE_AHEAD = 32  # slices read in parallel while writing


def encode(example: dict[str, Any], with_kspace: bool) -> bytes:
  """A source element's arrays as one record (an uncompressed .npz; no pickled objects)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{key: example[key] for key in STORED if with_kspace or key != 'kspace'})
  return buffer.getvalue()


# np.load parses each array's header with ast.literal_eval, and CPython 3.11's ast is not
# thread-safe ("SystemError: AST constructor recursion depth mismatch", seen with grain's reader
# threads on 3.11.7): one record is decoded at a time (a copy out of memory, not the I/O).
_DECODING = threading.Lock()


def decode(record: bytes) -> dict[str, np.ndarray]:
  with _DECODING, np.load(io.BytesIO(record), allow_pickle=False) as arrays:
    return {key: arrays[key] for key in arrays.files}


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
  """ROOT/prepared.json, checked to be one; DataError naming the file otherwise."""
  _check_store(root)
  path = files.as_path(root) / MANIFEST
  if not path.is_file():
    raise DataError(f'{path}: no such file; config.data.root must be a folder written by '
                    'fsmnet-prepare-data')
  try:
    manifest = json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f'{path}: not a prepared data manifest ({e})') from e
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise DataError(f'{path}: not a manifest of format {FORMAT}')
  return manifest


def setting_differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """'config.KEY=WANTED (prepared with RECORDED)' for each setting where `wanted` differs."""
  return [f'config.{key}={wanted.get(key)!r} (prepared with {value!r})'
          for key, value in recorded.items() if wanted.get(key) != value]


class ShardReader:
  """The records of one split of a prepared folder, by position (as grain asks for them)."""

  def __init__(self, root: str | os.PathLike, split: str, manifest: dict[str, Any]):
    shards = manifest['splits'][split]['shards']
    # Strings: array_record opens gs:// itself (its own Cloud Storage client), not via epath.
    self._paths = [os.fspath(files.as_path(root) / shard['file']) for shard in shards]
    for path, shard in zip(self._paths, shards):
      _check_shard(path, shard['records'])
    # Each file with its known record count: the data source need not open them all again.
    self._records = array_record_data_source.ArrayRecordDataSource(
        [f'{path}[0:{shard["records"]}]' for path, shard in zip(self._paths, shards)])
    self._ends = np.cumsum([shard['records'] for shard in shards])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    try:
      return decode(self._records[i])
    except (OSError, RuntimeError, ValueError) as e:
      shard = int(np.searchsorted(self._ends, i, side='right'))
      raise DataError(f'{self._paths[shard]}: record {i} cannot be read ({e})') from e


def _check_shard(path: str, records: int) -> None:
  try:  # a damaged file opens, and fails on close with riegeli's account of the damage
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
  except (OSError, RuntimeError, ValueError) as e:
    raise DataError(f'{path}: cannot be read as an ArrayRecord shard ({e or "missing"})') from e
  if count != records:
    raise DataError(f'{path}: holds {count} records where {MANIFEST} lists {records} '
                    '(truncated or replaced: prepare the data again)')


def _records_of(source: Any, count: int) -> Iterator[dict[str, Any]]:
  """source[0], source[1], ... read by a few threads ahead (h5py, zlib and FFTs release the
  GIL)."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for start in range(0, count, _WRITE_AHEAD):
      yield from pool.map(source.__getitem__, range(start, min(start + _WRITE_AHEAD, count)))


def _write_split(source: Any, folder: Path, split: str, with_kspace: bool,
                 shard_bytes: int, progress: Callable[[int], None]) -> dict[str, Any]:
  shards, volumes, writer, written = [], [], None, 0
  for i, example in enumerate(_records_of(source, len(source))):
    record = example['record']
    if not volumes or volumes[-1]['volume'] != record.volume:
      volumes.append({'volume': record.volume, 'subject': record.subject, 'slices': []})
    volumes[-1]['slices'].append(int(record.index))
    data = encode(example, with_kspace)
    if writer is None or written + len(data) > shard_bytes and shards[-1]['records']:
      if writer is not None:
        writer.close()
      shards.append({'file': f'{split}-{len(shards):05d}.array_record', 'records': 0})
      writer = array_record_module.ArrayRecordWriter(str(folder / shards[-1]['file']),
                                                     WRITER_OPTIONS)
      written = 0
    writer.write(data)
    written += len(data)
    shards[-1]['records'] += 1
    progress(i + 1)
  if writer is not None:
    writer.close()
  return {'slices': len(source), 'description': repr(source), 'shards': shards,
          'volumes': volumes}


def write_prepared(out: str | os.PathLike, sources: dict[str, Any], dataset: str,
                   settings: dict[str, Any], config: dict[str, Any], with_kspace: bool,
                   shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                   progress: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:
  """Writes each split's `sources[split]` into `out` with the manifest; returns the manifest.
  `out` (a folder or a URL) is written whole or not at all; an existing one is refused unless
  `overwrite`, and then replaced only once the new one is complete."""
  def write(folder: Path) -> None:
    folder.mkdir(parents=True)
    splits = {split: _write_split(source, folder, split, with_kspace, shard_bytes,
                                  lambda done, split=split, n=len(source): progress(split, done, n))
              for split, source in sources.items()}
    manifest.update(splits=splits)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))

  manifest = {'format': FORMAT, 'dataset': dataset, 'settings': settings,
              'compression': WRITER_OPTIONS, 'with_kspace': with_kspace,
              'config': config}
  refuse_existing_out(out, overwrite)
  files.write_folder(out, write, overwrite)  # the manifest, written last, lands last
  return manifest


def refuse_existing_out(out: str | os.PathLike, overwrite: bool) -> None:
  """FileExistsError for an `out` that exists, unless `overwrite` or an empty folder."""
  _check_store(out)
  files.refuse_existing([out], overwrite, folders=True)


def _check_store(root: str | os.PathLike) -> None:
  if files.is_url(root) and not os.fspath(root).startswith('gs://'):
    raise DataError(f'{os.fspath(root)}: prepared shards are read from local paths and gs:// '
                    'only (array_record reads no other store); use one of those')
