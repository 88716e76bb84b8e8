"""Paths that may be object-store URLs; writing outputs without ever leaving a half-written file
or losing an existing one; the cache folder.

A command's workdir, checkpoint and outputs may be local or a `gs://` / `s3://` URL: `as_path`
gives a URL as an `etils.epath.Path` (what orbax takes), whose backend (gcsfs, s3fs) talks to
the store. Object stores have no rename and no append: outputs for a URL are written locally
first and uploaded once complete (`write_together`), and files that grow (metrics, TensorBoard
events, profiles) are written to a local `StagedFolder` and uploaded whole at each `sync`.
Orbax reaches local paths and gs:// only (`orbax_reaches`); checkpoints elsewhere go through
local copies.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from etils import epath

Writer = Callable[[Path], None]
_COPY_CHUNK = 16 * 2**20


# A local path, or the path of a URL, which talks to its store (and keeps the '//' that
# pathlib would fold).
StoragePath = Path | epath.Path


def as_path(path: str | os.PathLike) -> StoragePath:
  """`path` as a pathlib.Path, or for a URL (gs://bucket/run) as an etils.epath.Path."""
  return epath.Path(path) if is_url(path) else Path(path)


def absolute_path(path: str | os.PathLike) -> StoragePath:
  """`as_path(path)`, made absolute if local (orbax wants absolute paths; a URL is one)."""
  return as_path(path) if is_url(path) else Path(path).absolute()


def is_url(path: str | os.PathLike) -> bool:
  """True for an object-store URL (gs://, s3://, ...), False for a local path."""
  return '://' in os.fspath(path)


def orbax_reaches(path: str | os.PathLike) -> bool:
  """Whether orbax reads and writes `path` itself: its tensorstore specs (orbax-checkpoint
  0.12.8) name the local file and gcs drivers only, and fold other URLs (s3://) into a
  relative local path."""
  return not is_url(path) or os.fspath(path).startswith('gs://')


def files_under(root: StoragePath) -> list[StoragePath]:
  """Every file under the folder `root`, at any depth, sorted. For a URL one listing of its
  prefix (epath refuses `**` patterns there, and a bucket lists objects, never folders)."""
  if not is_url(root):
    return sorted(p for p in Path(root).rglob('*') if p.is_file())
  import fsspec  # pylint: disable=import-outside-toplevel  # installed with gcsfs or s3fs
  scheme = os.fspath(root).split('://')[0]
  store, prefix = fsspec.core.url_to_fs(os.fspath(root))
  return [epath.Path(f'{scheme}://{name}') for name in sorted(store.find(prefix))]


@contextlib.contextmanager
def local_copy(path: StoragePath) -> Iterator[Path]:
  """`path` itself if local, else a copy of that file or folder in a temporary folder, removed
  on exit: for readers of local files (nibabel, h5py, orbax) given a path in a bucket."""
  if not is_url(path):
    yield Path(path)
    return
  with tempfile.TemporaryDirectory(prefix='fsmnet-download-') as folder:
    local = Path(folder) / path.name
    download(path, local)
    yield local


def download(remote: StoragePath, local: Path) -> None:
  """Copies the file or folder `remote` (a URL) to `local`."""
  if not remote.is_dir():
    _copy(remote, local)
    return
  prefix = os.fspath(remote).rstrip('/') + '/'
  for file in files_under(remote):
    target = local / os.fspath(file)[len(prefix):]
    target.parent.mkdir(parents=True, exist_ok=True)
    _copy(file, target)


def _copy(source: StoragePath, target: StoragePath) -> None:
  with source.open('rb') as reader, target.open('wb') as writer:
    shutil.copyfileobj(reader, writer, _COPY_CHUNK)  # shards of hundreds of MB, in pieces


def size_of(file: StoragePath) -> int:
  """A file's size in bytes, local or in a bucket (epath's stat names it otherwise)."""
  stat = file.stat()
  return stat.st_size if isinstance(stat, os.stat_result) else stat.length


def default_cache_dir() -> Path:
  """$XDG_CACHE_HOME/fsmnet-jax (~/.cache/fsmnet-jax): decoded volumes and compiled programs,
  never inside a data folder."""
  return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'fsmnet-jax'


def write_atomically(path: str | os.PathLike, write: Writer, overwrite: bool = False
                     ) -> StoragePath:
  """Calls `write(temporary_path)`, then moves the result (a file or a folder) to `path`.

  An existing `path` is refused unless `overwrite`; it is replaced only once the new output is
  complete, so an interrupted write leaves the old output intact and no partial one.
  """
  write_together({path: write}, overwrite)
  return as_path(path)


def write_folder(path: str | os.PathLike, write: Writer, overwrite: bool = False
                 ) -> StoragePath:
  """`write_atomically` for an output that is a folder; an existing empty local folder is
  filled in place instead, as it may be a mount point (a container's volume) or in a folder
  this user cannot write, and then cannot be replaced.

  `write` then writes into a staging folder inside it, whose entries are moved up in the order
  they were written (a mark of completeness written last lands last). Interrupted, the folder
  is left empty.
  """
  if not _is_empty_folder(path):
    return write_atomically(path, write, overwrite)
  folder = Path(path)
  staging, placed = folder / f'.partial-{os.getpid()}', []
  try:
    write(staging)
    for written in sorted(staging.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
      placed.append(folder / written.name)
      os.replace(written, placed[-1])
  except BaseException:
    for entry in placed:
      _remove(entry)
    raise
  finally:
    _remove(staging)
  return folder


def _is_empty_folder(path: str | os.PathLike) -> bool:
  return not is_url(path) and Path(path).is_dir() and not any(Path(path).iterdir())


def refuse_existing(paths: list[str | os.PathLike], overwrite: bool,
                    folders: bool | None = False) -> None:
  """FileExistsError naming those of `paths` that exist, unless `overwrite` (also called
  before long work, so that it is not wasted). With `folders` (outputs that are folders), an
  empty local folder is not in the way: `write_folder` fills it. Even with `overwrite`, a
  folder where the output is a file, or a file where it is a folder, is refused
  (`refuse_other_kind`); `folders=None`: the kind is checked once the output is written."""
  existing = [os.fspath(path) for path in paths
              if as_path(path).exists() and not (folders and _is_empty_folder(path))]
  if existing and not overwrite:
    raise FileExistsError(f'{", ".join(existing)}: already exists; pass --overwrite to replace '
                          f'{"them" if len(existing) > 1 else "it"}')
  if folders is not None:
    refuse_other_kind(existing, folders)


def refuse_other_kind(paths: list[str | os.PathLike], folders: bool) -> None:
  """FileExistsError for a local one of `paths` that is a folder where the output is a file,
  or a file where it is a folder: --overwrite replaces an earlier output, and such an entry is
  not one (a folder given as a file's name would be deleted with all in it)."""
  for path in paths:
    if not is_url(path) and os.path.lexists(path) and Path(path).is_dir() != folders:
      there, output = ('a file', 'a folder') if folders else ('a folder', 'a file')
      raise FileExistsError(f'{os.fspath(path)}: is {there}, and this output is {output}; '
                            '--overwrite replaces only an earlier output: move it or name '
                            'another path')


def write_together(writers: dict[str | os.PathLike, Writer], overwrite: bool = False) -> None:
  """`write_atomically` for outputs that belong together (an image and its mask): every one
  is written under a temporary name before any is moved into place, so an interruption
  leaves all the old outputs, or (bar the instant between two renames) all the new ones.

  A URL's output is written to a local temporary folder, then uploaded: nothing reaches the
  store unless every writer finished, but an upload cut short can leave part of it there.
  """
  refuse_existing(list(writers), overwrite, folders=None)
  leftovers = []
  try:
    finished = []
    for path, write in writers.items():
      if is_url(path):
        staging = Path(tempfile.mkdtemp(prefix='fsmnet-upload-'))
        leftovers.append(staging)
        temporary = staging / as_path(path).name
      else:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary names keep the suffixes: some writers pick the format from them.
        temporary = path.with_name(f'.partial-{os.getpid()}-{path.name}')
        leftovers.append(temporary)
      write(temporary)
      finished.append((temporary, path))
    for temporary, path in finished:
      refuse_other_kind([path], folders=temporary.is_dir())
    for temporary, path in finished:
      if is_url(path):
        upload(temporary, as_path(path))
        continue
      if path.exists():
        displaced = path.with_name(f'.old-{os.getpid()}-{path.name}')
        leftovers.append(displaced)
        os.replace(path, displaced)
      os.replace(temporary, path)
  finally:
    for leftover in leftovers:
      _remove(leftover)


def _remove(path: Path) -> None:
  """Deletes a local file or folder, if there is one."""
  if path.is_dir():
    shutil.rmtree(path)
  elif path.exists():
    path.unlink()


def upload(local: Path, destination: StoragePath, last: str | None = None) -> None:
  """Copies a local file or folder to `destination` (a URL), replacing what is there; the
  folder's file `last` (a mark of completeness) after all the others."""
  if destination.is_dir():
    destination.rmtree()
  elif destination.exists():
    destination.unlink()
  files = [local] if local.is_file() else sorted(p for p in local.rglob('*') if p.is_file())
  if last:
    files.sort(key=lambda p: p == local / last)
  for file in files:
    _copy(file, destination if file == local else
          destination / file.relative_to(local).as_posix())


class StagedFolder:
  """A folder for writers that append or need a local path (TensorBoard, jax.profiler,
  metrics.jsonl): `local` is `destination` itself, or for a URL a local temporary folder whose
  new and changed files `sync` uploads whole (object stores cannot append)."""

  def __init__(self, destination: str | os.PathLike):
    self.destination = as_path(destination)
    self._remote = is_url(destination)
    self.local = (Path(tempfile.mkdtemp(prefix='fsmnet-staged-')) if self._remote
                  else Path(destination))
    self._uploaded = {}  # local file -> (size, mtime) when last uploaded

  def fetch(self, name: str) -> None:
    """Copies `destination/name` into the local folder, if it exists (a file to append to)."""
    if self._remote and (self.destination / name).exists():
      local = self.local / name
      local.parent.mkdir(parents=True, exist_ok=True)
      local.write_bytes((self.destination / name).read_bytes())
      self._uploaded[local] = _signature(local)

  def sync(self) -> None:
    if not self._remote:
      return
    for file in sorted(p for p in self.local.rglob('*') if p.is_file()):
      if self._uploaded.get(file) != _signature(file):
        (self.destination / file.relative_to(self.local).as_posix()).write_bytes(
            file.read_bytes())
        self._uploaded[file] = _signature(file)

  def close(self) -> None:
    """Uploads what changed and removes the local copy."""
    if self._remote:
      try:
        self.sync()
      finally:
        shutil.rmtree(self.local, ignore_errors=True)


def _signature(file: Path) -> tuple[int, int]:
  stat = file.stat()
  return stat.st_size, stat.st_mtime_ns
