"""Orbax's console output, in one place: its chatter hidden, its errors one line each.

Orbax logs dozens of INFO lines per save or load, and after a failed read or write its threads,
its asyncio tasks and its tensorstore callbacks keep reporting the error that the caller has
already turned into one line naming the file. The filters here keep the console to that line.
"""

import logging
import sys
from types import TracebackType

from absl import logging as absl_logging


def passes_through_orbax(traceback: TracebackType | None) -> bool:
  """Whether an exception's traceback runs through orbax's code."""
  while traceback is not None:
    if '/orbax/' in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


def quiet_orbax_logs(show_tracebacks: bool = False) -> None:
  """Hides orbax's INFO lines (and gcsfs's lines, of buckets); its warnings and errors still
  show, as one line each unless `show_tracebacks` (the caller reports the error itself)."""
  handler = absl_logging.get_absl_handler()
  handler.addFilter(_not_orbax_chatter)
  if not show_tracebacks:
    handler.addFilter(_without_traceback)


def hide_orbax_logs() -> None:
  """Drops orbax's log lines from here on: once an error is reported (a failed read or write,
  bad input), its threads keep logging it or fail to start as the process ends, and asyncio
  logs each of its unretrieved futures."""
  absl_logging.get_absl_handler().addFilter(_not_orbax_aftermath)  # once: a set, in effect


def drop_orbax_stragglers() -> None:
  """Keeps the aftermath of a failed orbax read or write off the console (for this process).

  The reads and writes orbax had started still finish: their callbacks find its event loop
  closed, and their coroutines are collected holding the error already reported. Python would
  print each (hundreds) as 'Exception ignored' with a traceback.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_orbax_stragglers', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and 'Event loop is closed' in str(error)
            or passes_through_orbax(unraisable.exc_traceback)):
      previous(unraisable)

  hook.drops_orbax_stragglers = True
  sys.unraisablehook = hook


def hide_missing_step_metadata(record: logging.LogRecord) -> bool:
  """Filter: orbax warns that a step's metadata is missing when one item of the step is read
  on its own (the metadata sits one folder up)."""
  return 'Metadata file does not exist' not in record.getMessage()


def _not_orbax_chatter(record: logging.LogRecord) -> bool:
  # gcsfs (buckets) logs a line per file it reads, and each failed request with its traceback:
  # the failure reaches the caller as an exception, reported there as one line.
  if '/gcsfs/' in record.pathname:
    return False
  return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


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


def _not_orbax_aftermath(record: logging.LogRecord) -> bool:
  return not (_from_orbax(record) or record.name == 'asyncio')
