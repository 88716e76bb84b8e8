"""Writing outputs without ever leaving a half-written file or losing an existing one; the cache folder."""

import os
import shutil
from pathlib import Path
from typing import Callable

Writer = Callable[[Path], None]


def default_cache_dir() -> Path:
  """$XDG_CACHE_HOME/fsmnet-jax (~/.cache/fsmnet-jax): decoded volumes and compiled programs,
  never inside a data folder."""
  return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'fsmnet-jax'


def write_atomically(path: str | os.PathLike, write: Writer, overwrite: bool = False) -> Path:
  """Calls `write(temporary_path)`, then moves the result (a file or a folder) to `path`.

  An existing `path` is refused unless `overwrite`; it is replaced only once the new output is
  complete, so an interrupted write leaves the old output intact and no partial one.
  """
  path = Path(path)
  write_together({path: write}, overwrite)
  return path


def refuse_existing(paths: list[str | os.PathLike], overwrite: bool) -> None:
  """FileExistsError naming those of `paths` that exist, unless `overwrite` (also called
  before long work, so that it is not wasted)."""
  existing = [str(path) for path in paths if Path(path).exists()]
  if existing and not overwrite:
    raise FileExistsError(f'{", ".join(existing)}: already exists; pass --overwrite to replace '
                          f'{"them" if len(existing) > 1 else "it"}')


def write_together(writers: dict[Path, Writer], overwrite: bool = False) -> None:
  """`write_atomically` for outputs that belong together (an image and its mask): every one
  is written under a temporary name before any is moved into place, so an interruption
  leaves all the old outputs, or (bar the instant between two renames) all the new ones.
  """
  refuse_existing(list(writers), overwrite)
  leftovers = []
  try:
    finished = []
    for path, write in writers.items():
      path = Path(path)
      path.parent.mkdir(parents=True, exist_ok=True)
      # The temporary names keep the suffixes: some writers pick the format from them (.nii.gz).
      temporary = path.with_name(f'.partial-{os.getpid()}-{path.name}')
      leftovers.append(temporary)
      write(temporary)
      finished.append((temporary, path))
    for temporary, path in finished:
      if path.exists():
        displaced = path.with_name(f'.old-{os.getpid()}-{path.name}')
        leftovers.append(displaced)
        os.replace(path, displaced)
      os.replace(temporary, path)
  finally:
    for leftover in leftovers:
      if leftover.is_dir():
        shutil.rmtree(leftover)
      elif leftover.exists():
        leftover.unlink()
