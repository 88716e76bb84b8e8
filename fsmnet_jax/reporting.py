"""Where runs report: TensorBoard events, metrics.jsonl, a console progress bar, quiet logs."""

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TextIO

from absl import logging as absl_logging
from tensorboardX import SummaryWriter

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """Scalars to TensorBoard event files and to `workdir/metrics.jsonl` (one JSON object per
  line: {"step": N, name: value, ...}). Only process 0 writes; the others call it for nothing."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      workdir = Path(workdir)
      self._tensorboard = SummaryWriter(str(workdir / TENSORBOARD_DIR))
      self._jsonl = open(workdir / METRICS_FILE, 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {name: float(value) for name, value in scalars.items()}
    for name, value in scalars.items():
      if math.isfinite(value):  # a skipped non-finite step shows as a gap in TensorBoard
        self._tensorboard.add_scalar(name, value, step)
    # NaN/inf would make invalid JSON; they are written as strings.
    printable = {k: v if math.isfinite(v) else str(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({'step': step, **printable}) + '\n')
    self._jsonl.flush()
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()
      self._jsonl.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


def _not_orbax_chatter(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def passes_through_orbax(traceback: TracebackType | None) -> bool:
  """Whether an exception's traceback runs through orbax's code."""
  while traceback is not None:
    if '/orbax/' in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def _from_orbax(record: logging.LogRecord) -> bool:
  # asyncio logs orbax's unretrieved task errors as its own, with orbax in the traceback;
  # `_without_traceback` may have taken that traceback off already, and says so.
  return '/orbax/' in record.pathname or getattr(record, 'from_orbax', False) or bool(
      record.exc_info and passes_through_orbax(record.exc_info[2]))


def _without_traceback(record: logging.LogRecord) -> bool:
  if _from_orbax(record):
    record.from_orbax = True
    record.exc_info, record.exc_text = None, None
  return True


def hide_orbax_logs() -> None:
  """Drops orbax's log lines from here on: once an error is reported (a failed read or write,
  bad input), its threads keep logging it or fail to start as the process ends, and asyncio
  logs each of its unretrieved futures."""
  absl_logging.get_absl_handler().addFilter(_not_orbax_aftermath)  # once: a set, in effect


def _not_orbax_aftermath(record: logging.LogRecord) -> bool:
  return not (_from_orbax(record) or record.name == 'asyncio')


def quiet_orbax_logs(show_tracebacks: bool = False) -> None:
  """Hides orbax's INFO lines (dozens per save or load); its warnings and errors still show,
  as one line each unless `show_tracebacks` (the caller reports the error itself)."""
  handler = absl_logging.get_absl_handler()
  handler.addFilter(_not_orbax_chatter)
  if not show_tracebacks:
    handler.addFilter(_without_traceback)


class ProgressBar:
  """One console line: step (or another `unit`), loss if given, rate and ETA. Quiet under CI
  or when not a terminal (log lines tell the progress there)."""
  WIDTH = 24

  def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr,
               enabled: bool | None = None, unit: str = 'step'):
    if enabled is None:
      enabled = stream.isatty() and not os.environ.get('CI')
    self._enabled, self._stream = enabled, stream
    self._total, self._start, self._unit = total_steps, start_step, unit
    self._started_at = time.monotonic()

  def update(self, step: int, loss: float | None = None) -> None:
    if not self._enabled:
      return
    done = step - self._start
    elapsed = time.monotonic() - self._started_at
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self._total - step) / rate if rate > 0 else float('nan')
    filled = int(self.WIDTH * step / max(self._total, 1))
    bar = '#' * filled + '.' * (self.WIDTH - filled)
    loss_text = f'  loss {loss:.4f}' if loss is not None else ''
    eta_text = _duration(eta) if math.isfinite(eta) else '-'
    self._stream.write(f'\r[{bar}] {self._unit} {step}/{self._total}{loss_text}  '
                       f'{rate:.2f} {self._unit}s/s  ETA {eta_text} ')
    self._stream.flush()

  def close(self) -> None:
    if self._enabled:
      self._stream.write('\n')
      self._stream.flush()
