"""Orbax checkpoints: a model's variables on their own (converted or exported), and training runs."""

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import grain.python as grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from fsmnet_jax.files import (StoragePath, absolute_path, as_path, download, is_url, local_copy,
                              orbax_reaches, upload, write_folder)
from fsmnet_jax.orbax_logs import (drop_orbax_stragglers, hide_missing_step_metadata,
                                   hide_orbax_logs)


TRAIN_CHECKPOINT_DIR = 'checkpoints'  # in a training workdir
# Orbax's mark of a complete step folder in a bucket, where a folder cannot be renamed into
# place: written last.
COMMIT_MARK = 'commit_success.txt'


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not hold what it should; names the file."""


class CheckpointWriteError(OSError):
  """A training checkpoint that could not be written (disk full, no permission, ...)."""


def save_variables(variables: dict[str, Any], directory: str | os.PathLike,
                   overwrite: bool = False) -> StoragePath:
  """Saves {'params': ...} to `directory` (refused if it exists, unless `overwrite`)."""
  variables = {'params': variables['params']}

  def write(path) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(absolute_path(path), variables)

  return write_folder(directory, write, overwrite)


def load_variables(directory: str | os.PathLike) -> dict[str, Any]:
  """Loads the {'params': ...} tree saved by `save_variables`, as numpy arrays."""
  directory = as_path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint folder')
  with _reading(directory, 'orbax checkpoint'):
    restored = restore_as_numpy(absolute_path(directory))
  if not isinstance(restored, dict) or 'params' not in restored:
    raise CheckpointError(f'{directory}: holds no "params" tree')
  return {'params': restored['params']}


def restore_as_numpy(path: StoragePath) -> Any:
  """The tree saved in `path`, as numpy arrays whole on every process (whatever devices and
  processes saved it: restored as saved, orbax refuses another topology)."""
  if not orbax_reaches(path):
    with local_copy(path) as local:
      return restore_as_numpy(local)
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path).item_metadata
    if metadata is None:
      raise FileNotFoundError(f'{path}/_METADATA: missing (the saved tree and its arrays)')
    tree = metadata.tree
    args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


class TrainCheckpoints:
  """A training run's checkpoints in `directory`, through an orbax `CheckpointManager`.

  Each step folder holds the train state ('state': params, optimizer state, step, RNG, EMA)
  and the grain iterator position of every process ('data'). Saves are asynchronous and
  atomic: a save cut short (a kill -9) leaves a temporary folder that is never restored and is
  cleaned up at the next start. The latest `keep` are kept, plus the best by `best_metric`.
  In a store orbax cannot write (s3://) orbax works in a local `_StagedSteps` folder, and
  each save is uploaded before `save` returns.
  """

  def __init__(self, directory: str | os.PathLike, keep: int, best_metric: str):
    self.directory = absolute_path(directory)
    self._staged = None if orbax_reaches(self.directory) else _StagedSteps(self.directory)
    policies = ocp.checkpoint_managers.preservation_policy
    keep_policy = policies.AnyPreservationPolicy([
        policies.LatestN(keep),
        policies.BestN(get_metric_fn=lambda metrics: metrics[best_metric], n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=keep_policy,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(
        self._staged.local if self._staged else self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.PyGrainCheckpointHandler()})
    self._step_in_flight = None
    drop_orbax_stragglers()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_compatible(self, step: int, state: Any) -> None:
    """Raises CheckpointError unless checkpoint `step` holds arrays of `state`'s shapes."""
    folder = self.directory / str(step)
    try:
      saved = self._manager.item_metadata(step)['state']
    except Exception as e:  # orbax raises many types for damaged folders
      raise CheckpointError(
          f'{folder}: unreadable checkpoint metadata ({describe_error(e)})') from e
    mismatch = describe_mismatch(shapes_by_path(state), shapes_by_path(saved))
    if mismatch:
      raise CheckpointError(
          f'{folder}: this checkpoint is of a different model or optimizer than the config '
          f'describes ({mismatch}). Use a new --workdir, or the config the run was started '
          f'with (saved as config.json in the workdir).')

  def restore(self, step: int, state: Any, data_iterator: Any) -> tuple[Any, Any]:
    """Checkpoint `step` restored into `state`'s structure and shardings, and the iterator."""
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with _reading(self.directory / str(step), 'training checkpoint'):
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=grain.PyGrainCheckpointRestore(data_iterator)))
    return restored['state'], restored['data']

  def save(self, step: int, state: Any, data_iterator: Any,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save (returns once the arrays are copied off the devices).

    Raises CheckpointWriteError if this save, or the one before it, could not be written.
    """
    self._finish_save_in_flight()
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.PyGrainCheckpointSave(data_iterator)),
          metrics=metrics, force=True)
    except Exception as e:  # an OSError, or whatever tensorstore raises for it
      raise self._write_error(step, e) from e
    self._step_in_flight = step
    if self._staged:
      self._finish_save_in_flight()

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager."""
    try:
      self._finish_save_in_flight()
    finally:
      self._manager.close()
      if self._staged:
        self._staged.close()

  def _finish_save_in_flight(self) -> None:
    step, self._step_in_flight = self._step_in_flight, None
    if step is None:  # none started, or its failure was reported already
      return
    try:
      self._manager.wait_until_finished()
      if self._staged:
        self._staged.upload()
    except Exception as e:  # an OSError, or whatever tensorstore or the store raises for it
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, error: Exception) -> CheckpointWriteError:
    complete = [int(p.name) for p in _complete_steps(self.directory)]
    kept = (f'the latest complete checkpoint, step {max(complete)}, is intact' if complete
            else 'no complete checkpoint was written yet')
    hide_orbax_logs()
    return CheckpointWriteError(
        f'{self.directory}: could not write the checkpoint of step {step} '
        f'({_os_reason(error)}); {kept}')


class _StagedSteps:
  """A local mirror of the step folders in `remote`, a store orbax cannot write: it starts
  with the complete ones (removing from `remote` the others, uploads or removals cut short);
  `upload` sends each new step folder, its COMMIT_MARK last, and removes from `remote` the
  steps orbax's preservation policy dropped here, their COMMIT_MARK first."""

  def __init__(self, remote: StoragePath):
    if jax.process_count() > 1:
      # Orbax's multi-process saves need one folder that every process writes.
      raise CheckpointError(f'{remote}: orbax cannot write this store, and checkpoints '
                            f'staged on each of {jax.process_count()} hosts would not make '
                            f'one checkpoint; use gs:// or a shared file system')
    self.remote = remote
    # Removed by close(), or at exit when a start fails before training (a wrong config).
    self._folder = tempfile.TemporaryDirectory(prefix='fsmnet-checkpoints-')
    self.local = Path(self._folder.name)
    self._uploaded = set()  # the complete steps in `remote`: only this process writes there
    for step in _complete_steps(remote):
      download(step, self.local / step.name)
      self._uploaded.add(step.name)
    for folder in remote.iterdir() if remote.is_dir() else []:
      if folder.name.isdigit() and folder.name not in self._uploaded:
        folder.rmtree()

  def upload(self) -> None:
    local = {p.name for p in self.local.iterdir() if p.name.isdigit()}
    for name in sorted(local - self._uploaded, key=int):
      # Orbax writes its COMMIT_MARK in local step folders too.
      upload(self.local / name, self.remote / name, last=COMMIT_MARK)
      self._uploaded.add(name)
    for name in sorted(self._uploaded - local, key=int):
      (self.remote / name / COMMIT_MARK).unlink()  # a removal cut short is never restored
      (self.remote / name).rmtree()
      self._uploaded.remove(name)

  def close(self) -> None:
    self._folder.cleanup()


def _os_reason(error: Exception) -> str:
  """'[Errno 28] No space left on device' from an OSError or a tensorstore error (which says
  os_error_code=28 at the end of a paragraph of paths); else the error's first line."""
  code = getattr(error, 'errno', None)
  if code is None:
    found = re.search(r"os_error_code='?(\d+)", str(error))
    code = found and int(found.group(1))
  return f'[Errno {code}] {os.strerror(code)}' if code else describe_error(error)


def describe_error(error: Exception) -> str:
  """'Type: first line of the message' (orbax and tensorstore messages run to many lines)."""
  lines = str(error).strip().splitlines()
  if not lines:
    return type(error).__name__
  return f'{type(error).__name__}: {lines[0].split(" See full TensorStore details")[0][:200]}'


@contextlib.contextmanager
def _reading(folder: StoragePath, what: str) -> Iterator[None]:
  """Turns a failed orbax read of `folder` into a CheckpointError naming it."""
  drop_orbax_stragglers()
  try:
    yield
  except Exception as e:  # orbax raises many types for damaged folders
    hide_orbax_logs()
    raise CheckpointError(f'{folder}: not a readable {what} ({describe_error(e)})') from e


def describe_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
                      ) -> str:
  """'' when the {path: shape} maps agree, else what is missing, unexpected or reshaped."""
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  reshaped = sorted(f'{k} {found[k]} instead of {expected[k]}'
                    for k in set(expected) & set(found) if expected[k] != found[k])
  return '; '.join(f'{label}: {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
                   for label, keys in (('missing', missing), ('unexpected', unexpected),
                                       ('other shape', reshaped)) if keys)


def latest_train_step(workdir: str | os.PathLike) -> StoragePath | None:
  """The latest complete step folder of a training workdir (None if it has none)."""
  directory = as_path(workdir) / TRAIN_CHECKPOINT_DIR
  steps = [p for p in _complete_steps(directory) if (p / 'state').is_dir()]
  return max(steps, key=lambda p: int(p.name)) if steps else None


def _complete_steps(directory: StoragePath) -> list[StoragePath]:
  """The step folders of complete saves. A save in progress, or cut short, is a temporary
  folder whose name is not a plain step number, or in a bucket (no rename there) a step folder
  without its COMMIT_MARK."""
  if not directory.is_dir():
    return []
  return [p for p in directory.iterdir() if p.name.isdigit() and (
      (p / COMMIT_MARK).exists() if is_url(p) else ocp.utils.is_checkpoint_finalized(p))]


def load_train_params(step_folder: str | os.PathLike) -> dict[str, Any]:
  """{'params': ...} of a training checkpoint step, as numpy: the EMA of the parameters when
  the run kept one (training evaluates those), else the parameters."""
  path = absolute_path(step_folder) / 'state'
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(hide_missing_step_metadata)
  try:
    with _reading(path.parent, 'training checkpoint'):
      state = restore_as_numpy(path)
  finally:
    absl_logger.removeFilter(hide_missing_step_metadata)
  if not isinstance(state, dict) or 'params' not in state:
    raise CheckpointError(f'{path.parent}: holds no "params" in its train state')
  return {'params': state.get('ema_params') or state['params']}


def shapes_by_path(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} of a tree's arrays (live arrays, numpy, or saved metadata)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def _path_name(path) -> str:
  # Saved metadata is a nested dict, the live state a dataclass of namedtuples: compare the
  # names only.
  return '/'.join(str(getattr(p, 'key', getattr(p, 'name', getattr(p, 'idx', p)))) for p in path)
