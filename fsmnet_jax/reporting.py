"""Where runs report: TensorBoard events, metrics.jsonl and a console progress bar."""

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fsmnet_jax.files import StagedFolder

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


# The instruction sets that decide which kernels the CPU runs, as /proc/cpuinfo flags them.
CPU_FEATURES = {'avx512f': 'AVX-512', 'avx512_bf16': 'AVX512-BF16', 'amx_tile': 'AMX'}


def cpu_model(cpuinfo: Path = Path('/proc/cpuinfo')) -> str:
  """The CPU, as every timing names it: its model name with family, model and vector units
  from `cpuinfo` where there is one ('AMD EPYC (family 26, model 2; AVX-512, AVX512-BF16)'):
  a VM's model name alone may not tell one generation from another."""
  try:
    fields = {}
    for line in cpuinfo.read_text().splitlines():
      key, _, value = line.partition(':')
      if not key.strip() and fields:  # the end of the first processor's entry
        break
      fields.setdefault(key.strip(), value.strip())
  except OSError:
    return platform.processor() or 'unknown'
  flags = fields.get('flags', '').split()
  details = [f"family {fields['cpu family']}, model {fields['model']}"
             ] if 'cpu family' in fields and 'model' in fields else []
  features = [name for flag, name in CPU_FEATURES.items() if flag in flags]
  details += [', '.join(features)] if features else []
  name = fields.get('model name') or platform.processor() or 'unknown'
  return f"{name} ({'; '.join(details)})" if details else name


def new_figure(size: tuple[float, float]) -> Any:
  """A matplotlib Figure, built and saved directly: no pyplot, display or backend needed.
  Imported here, not at the top: matplotlib takes ~1-2 s to import, which every fsmnet-train
  start would pay for figures only the evaluation and report tools draw."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=size)


class MetricWriter:
  """Scalars to TensorBoard event files and to `workdir/metrics.jsonl` (one JSON object per
  line: {"step": N, name: value, ...}); a workdir in a bucket gets both uploaded at each write.
  Only process 0 writes; the others call it for nothing."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      self._folder = StagedFolder(workdir)
      self._folder.fetch(METRICS_FILE)  # a resumed run appends to it
      self._tensorboard = _summary_writer_class()(str(self._folder.local / TENSORBOARD_DIR))
      self._jsonl = open(self._folder.local / METRICS_FILE, 'a')

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
    self._folder.sync()

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()
      self._jsonl.close()
      self._folder.close()


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch, when installed, only to accept torch tensors (this writes floats):
  2.5 s of every training process's start (idle 2-core Zen 3; 5-8 s under load). Blocking that
  import for the moment of tensorboardX's makes it fall back to numpy; torch stays importable.
  """
  blocking = 'torch' not in sys.modules
  if blocking:
    sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if blocking:
      del sys.modules['torch']
  return SummaryWriter


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


class ProgressBar:
  """One console line: step (or another `unit`), loss if given, rate and ETA. Quiet under CI
  or when not a terminal (log lines tell the progress there)."""
  WIDTH = 24

  def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO = sys.stderr,
               enabled: bool | None = None, unit: str = 'step', images_per_step: int = 0):
    if enabled is None:
      enabled = stream.isatty() and not os.environ.get('CI')
    self._enabled, self._stream = enabled, stream
    self._total, self._start, self._unit = total_steps, start_step, unit
    self._images_per_step = images_per_step
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
    images_text = (f'  {rate * self._images_per_step:.1f} images/s' if self._images_per_step
                   else '')
    self._stream.write(f'\r[{bar}] {self._unit} {step}/{self._total}{loss_text}  '
                       f'{rate:.2f} {self._unit}s/s{images_text}  ETA {eta_text} ')
    self._stream.flush()

  def close(self) -> None:
    if self._enabled:
      self._stream.write('\n')
      self._stream.flush()
