"""Speed in the logs (images/s, step time, input time, MFU from the compiled step's FLOPs) and
the multi-process stop check that is not paid on every step."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fsmnet_jax import throughput, train


def test_flops_come_from_the_compiled_program():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  assert throughput.compiled_flops(compiled) == 2 * 8 * 16 * 4  # multiply-adds, twice


def test_a_loops_flops_are_its_body_times_its_trips():
  """XLA counts a loop's body once (why the train step's FLOPs under gradient accumulation are
  scaled by the micro-batches, in fsmnet-train's MFU and in fsmnet-bench)."""
  a, b = jnp.ones((4, 8, 16)), jnp.ones((16, 16))
  loop = lambda a, b: jax.lax.scan(lambda carry, x: (carry + x @ b, None), a[0] * 0, a)[0]
  compiled = jax.jit(loop).lower(a, b).compile()
  body = 2 * 8 * 16 * 16
  assert body <= throughput.compiled_flops(compiled) < 2 * body  # the body, and its adds
  assert throughput.compiled_flops(compiled, loop_trips=4) == 4 * throughput.compiled_flops(
      compiled)


def test_peak_flops_from_the_config_else_the_device_kind():
  cpu = jax.devices('cpu')[0]
  assert throughput.peak_flops(cpu) is None  # a CPU has no entry: no MFU unless configured
  assert throughput.peak_flops(cpu, configured_tflops=2.5) == 2.5e12

  class FakeDevice:
    device_kind = 'TPU v4'
  assert throughput.peak_flops(FakeDevice()) == 275e12


def test_rates_over_the_steps_since_the_last_restart(monkeypatch):
  clock = iter([10.0, 14.0, 20.0, 21.0])
  monkeypatch.setattr(throughput.time, 'perf_counter', lambda: next(clock))
  meter = throughput.Throughput(global_batch=8, flops_per_step=3e12, peak_flops_per_s=1e12)
  assert meter.rates() == {}  # no step yet (reads no clock)
  for _ in range(4):
    meter.took_input(0.25)
    meter.stepped()
  rates = meter.rates()  # 4 steps in 4 s
  assert rates == {'images_per_s': 8.0, 'step_seconds': 1.0, 'input_seconds': 0.25, 'mfu': 3.0}
  meter.restart()  # at 20 s: an evaluation is not training
  meter.stepped()
  assert meter.rates()['step_seconds'] == 1.0


def test_several_processes_agree_on_a_signal_every_n_steps_only(monkeypatch):
  calls = []

  def allgather(flag):
    calls.append(bool(flag))
    return np.array([flag, False])  # this process and another one

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  stop = train._StopRequest()  # pylint: disable=protected-access
  try:
    assert not any(stop.requested(step, check_every=10) for step in range(1, 25))
    assert len(calls) == 2  # steps 10 and 20: no collective on the 22 steps between
    stop.signal_name = 'SIGTERM'  # as the handler sets it
    assert [stop.requested(step, 10) for step in (25, 29, 30)] == [False, False, True]
  finally:
    stop.restore()
  assert calls == [False, False, True]
