"""Writing outputs without ever leaving a half-written file or losing an existing one."""

import os
import shutil
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None],
                     overwrite: bool = False) -> Path:
  """Calls `write(temporary_path)`, then moves the result (a file or a folder) to `path`.

  An existing `path` is refused unless `overwrite`; it is replaced only once the new output is
  complete, so an interrupted write leaves the old output intact and no partial one.
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists; pass --overwrite to replace it')
  path.parent.mkdir(parents=True, exist_ok=True)
  # The temporary names keep the suffixes: some writers pick the format from them (.nii.gz).
  temporary = path.with_name(f'.partial-{os.getpid()}-{path.name}')
  displaced = path.with_name(f'.old-{os.getpid()}-{path.name}')
  try:
    write(temporary)
    if path.exists():
      os.replace(path, displaced)
    os.replace(temporary, path)
  finally:
    for leftover in (temporary, displaced):
      if leftover.is_dir():
        shutil.rmtree(leftover)
      elif leftover.exists():
        leftover.unlink()
  return path
