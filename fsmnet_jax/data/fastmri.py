"""fastMRI knee: PD (auxiliary) / PDFS (target) volume pairs from h5 files, single- or multi-coil;
and the k-space pairs of fastMRI-format files in general (`KspacePair`, M4Raw's too).

Pairs come from a CSV whose rows start with the PD and the PDFS file names (without `.h5`), as
in the reference's data_split files (fastMRI's single- and multi-coil knee files share their
names). Images are the magnitude of the inverse FFT of the k-space (multi-coil: the
root-sum-of-squares of the coil images), center-cropped to the reconstruction size (320 for the
knee data: the crop also removes the readout's 2x oversampling).
"""

import contextlib
import csv
import dataclasses
import os
import threading
import xml.etree.ElementTree as ElementTree
from typing import Any, Iterator

import h5py
import numpy as np

from fsmnet_jax.data import DataError
from fsmnet_jax.files import StoragePath, as_path, is_url

ISMRMRD_NAMESPACE = {'m': 'http://www.ismrm.org/ISMRMRD'}


@dataclasses.dataclass(frozen=True)
class KspacePair:
  """One subject's target and reference k-space files, slice by slice: each a tuple of
  repetitions (averaged; fastMRI has one)."""
  subject: str
  target: tuple[StoragePath, ...]
  reference: tuple[StoragePath, ...]
  num_slices: int


@contextlib.contextmanager
def _open_h5(path: StoragePath) -> Iterator[h5py.File]:
  """The h5 file at `path`; in a bucket, kept open by this process (`_BucketFiles`)."""
  if not is_url(path):
    with h5py.File(path, 'r') as f:
      yield f
    return
  with _BUCKET_FILES.open(path) as f:
    yield f


@dataclasses.dataclass
class _OpenFile:
  raw: Any  # the store's file object, which h5py reads through
  h5: h5py.File
  reading: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  users: int = 0  # threads between taking it and giving it back

  def close(self) -> None:
    self.h5.close()
    self.raw.close()


class _BucketFiles:
  """h5 files in buckets, open in this process: opening one costs several requests (its
  metadata), and every example reads a slice of two files. Each file is read by one thread at
  a time (h5py reads through the file object's position); beyond `most` open, the least
  recently opened that no thread holds are closed."""

  def __init__(self, most: int):
    self._most, self._files, self._lock = most, {}, threading.Lock()

  @contextlib.contextmanager
  def open(self, path: StoragePath) -> Iterator[h5py.File]:
    key = (os.getpid(), os.fspath(path))  # grain's worker processes open their own
    with self._lock:
      if key not in self._files:
        idle = [k for k, entry in self._files.items() if not entry.users]
        for evicted in idle[:max(len(self._files) + 1 - self._most, 0)]:
          self._files.pop(evicted).close()
        self._files[key] = _open_in_bucket(key[1])
      entry = self._files[key]
      entry.users += 1
    try:
      with entry.reading:
        yield entry.h5
    finally:
      with self._lock:
        entry.users -= 1


def _open_in_bucket(url: str) -> _OpenFile:
  import fsspec  # pylint: disable=import-outside-toplevel  # installed with gcsfs
  # A plain read-ahead cache: gcsfs's default adds a background prefetcher per open file, whose
  # threads outlive it.
  store, name = fsspec.core.url_to_fs(url)
  raw = store.open(name, 'rb', cache_type='readahead')
  try:
    return _OpenFile(raw, h5py.File(raw, 'r'))
  except Exception:
    raw.close()
    raise


_BUCKET_FILES = _BucketFiles(most=16)


def read_header(path: StoragePath) -> dict[str, tuple[int, int]]:
  """Encoded and reconstruction matrix sizes (x, y) from the file's ISMRMRD header."""
  try:
    with _open_h5(path) as f:
      root = ElementTree.fromstring(f['ismrmrd_header'][()])
    sizes = {}
    for key, space in (('encoding_size', 'encodedSpace'), ('recon_size', 'reconSpace')):
      matrix = root.find(f'm:encoding/m:{space}/m:matrixSize', ISMRMRD_NAMESPACE)
      sizes[key] = (int(matrix.find('m:x', ISMRMRD_NAMESPACE).text),
                    int(matrix.find('m:y', ISMRMRD_NAMESPACE).text))
    return sizes
  except (OSError, KeyError, AttributeError, ElementTree.ParseError, ValueError) as e:
    raise DataError(f'{path}: no readable ISMRMRD header ({type(e).__name__}: {e})') from e


def kspace_shape(path: StoragePath, multicoil: bool = False) -> tuple[int, ...]:
  """The shape of the file's complex `kspace`: (slices, [coils,] rows, cols)."""
  layout, dims = (('(slices, coils, rows, cols) for multi-coil', 4) if multicoil else
                  ('(slices, rows, cols) for single-coil', 3))
  try:
    with _open_h5(path) as f:
      volume = f['kspace']
      if volume.ndim != dims or not np.issubdtype(volume.dtype, np.complexfloating):
        raise DataError(f'{path}: "kspace" must be complex {layout} data; got {volume.dtype} '
                        f'{volume.shape}')
      return volume.shape
  except (OSError, KeyError) as e:
    raise DataError(f'{path}: not a readable fastMRI h5 file with "kspace" ({e})') from e


def read_pairs(csv_file: str | os.PathLike, root: str | os.PathLike, multicoil: bool = False
               ) -> list[KspacePair]:
  """The PD/PDFS pairs listed in `csv_file`, resolved under `root` (PDFS the target)."""
  csv_file, root = as_path(csv_file), as_path(root)
  if not csv_file.is_file():
    raise DataError(f'{csv_file}: no such pairs file')
  pairs = []
  for line, row in enumerate(csv.reader(csv_file.read_text().splitlines()), start=1):
    if len(row) < 2:
      raise DataError(f'{csv_file}:{line}: expected "PD file, PDFS file, ..."; got {row}')
    pd, pdfs = (root / f'{name.strip()}.h5' for name in row[:2])
    for path in (pd, pdfs):
      if not path.is_file():
        raise DataError(f'{csv_file}:{line}: {path} does not exist')
    pairs.append(KspacePair(pdfs.stem, (pdfs,), (pd,), min(
        kspace_shape(pd, multicoil)[0], kspace_shape(pdfs, multicoil)[0])))
  if not pairs:
    raise DataError(f'{csv_file}: lists no pairs')
  return pairs


def read_kspace_slice(path: StoragePath, index: int) -> np.ndarray:
  """One complex ([coils,] rows, cols) k-space slice."""
  try:
    with _open_h5(path) as f:
      values = f['kspace'][index]
  except (OSError, KeyError) as e:
    raise DataError(f'{path}: cannot read k-space slice {index} ({e})') from e
  if not np.isfinite(values).all():
    raise DataError(f'{path}: slice {index} holds NaN/inf k-space samples')
  return values


def read_kspace(paths: tuple[StoragePath, ...], index: int) -> np.ndarray:
  """Slice `index` of the files' k-space, averaged over them (repetitions of one scan: the
  k-space of a scan with that many averages)."""
  values = [read_kspace_slice(path, index) for path in paths]
  return values[0] if len(values) == 1 else np.mean(values, axis=0).astype(values[0].dtype)
