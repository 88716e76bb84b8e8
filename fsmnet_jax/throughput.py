"""How fast training runs: images/s, step time, the host's time taking input, and the model
FLOPs utilisation (MFU) estimated from the compiled step's own FLOP count.

MFU = FLOPs per step and device (XLA's cost analysis of the compiled, partitioned step) / step
time / the device's peak. The peak is `config.train.peak_tflops` if set, else looked up by the
device kind in PEAK_TFLOPS (dense bfloat16, from the vendors' data sheets; the float32 peaks
are lower, so a float32 run's MFU against them says how far bfloat16 could take it). CPUs and
unknown devices get no MFU unless the peak is set.
"""

import time

import jax

# Dense bfloat16 TFLOP/s per device (a TPU chip, a GPU), by `jax.Device.device_kind`.
PEAK_TFLOPS = {
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,  # v5e
    'TPU v5': 459.0,  # v5p
    'TPU v6 lite': 918.0,  # Trillium (v6e)
    'NVIDIA A100-SXM4-40GB': 312.0,
    'NVIDIA A100-SXM4-80GB': 312.0,
    'NVIDIA A100 80GB PCIe': 312.0,
    'NVIDIA H100 80GB HBM3': 989.0,  # SXM
    'NVIDIA H100 PCIe': 756.0,
    'NVIDIA H200': 989.0,
    'NVIDIA L4': 121.0,
}


def peak_flops(device: jax.Device, configured_tflops: float = 0.0) -> float | None:
  """FLOP/s of one `device`: `configured_tflops` if set, else PEAK_TFLOPS's; None if unknown."""
  tflops = configured_tflops or PEAK_TFLOPS.get(device.device_kind)
  return tflops * 1e12 if tflops else None


def compiled_flops(compiled: jax.stages.Compiled, loop_trips: int = 1) -> float | None:
  """FLOPs of one call of `compiled` on one device, from XLA's cost analysis (None where the
  backend gives none).

  XLA counts a loop's body once. For a program whose work is a loop of `loop_trips` iterations
  (the train step's gradient accumulation over micro-batches) the count is scaled by them; the
  work outside the loop (the optimizer's) is then over-counted as much, small against the
  network's."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) * loop_trips if flops and flops > 0 else None


class Throughput:
  """Rates over the stretch of steps since the last `restart()`: call `restart()` after
  anything that is not training (compilation, evaluation, checkpoints), `took_input(s)` for
  each batch taken, `stepped()` after each step, and `rates()` once the steps are finished on
  the device (after a host read of their results)."""

  def __init__(self, global_batch: int, flops_per_step: float | None = None,
               peak_flops_per_s: float | None = None):
    self._batch, self._flops, self._peak = global_batch, flops_per_step, peak_flops_per_s
    self.restart()

  def restart(self) -> None:
    self._started, self._steps, self._input_seconds = time.perf_counter(), 0, 0.0

  def took_input(self, seconds: float) -> None:
    self._input_seconds += seconds

  def stepped(self) -> None:
    self._steps += 1

  def rates(self) -> dict[str, float]:
    """{'images_per_s', 'step_seconds', 'input_seconds' (per step), 'mfu' (if the FLOPs and
    the peak are known)}; empty before any step."""
    if not self._steps:
      return {}
    step_seconds = (time.perf_counter() - self._started) / self._steps
    rates = {'images_per_s': self._batch / step_seconds, 'step_seconds': step_seconds,
             'input_seconds': self._input_seconds / self._steps}
    if self._flops and self._peak:
      rates['mfu'] = self._flops / step_seconds / self._peak
    return rates
