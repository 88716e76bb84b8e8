"""Parent side of fsmnet-bench: each measurement in a fresh process of `fsmnet_bench.workers`."""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fsmnet_bench.plan import FRAMEWORKS, Spec

RESULT_PREFIX = 'BENCH_RESULT '  # a worker's stdout line with its result, as JSON
WORKER_TIMEOUT_S = 900


def _worker_command(*args: str) -> list[str]:
  """The command line of a worker process with these arguments."""
  return [sys.executable, '-m', 'fsmnet_bench.workers', *args]


def save_weights(model: str, path: Path) -> None:
  """Writes one Flax initialisation of `model` (PyTorch's scheme, seed 0) to `path`.

  It runs on the CPU, so that every machine gets the same weights, and in a process of its
  own, so that this one holds no accelerator memory.
  """
  subprocess.run(_worker_command('--init-weights', model, str(path)),
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=True)


def xla_flags(inherited: str, devices: int) -> str:
  """The caller's XLA_FLAGS (XLA options to compare, e.g. `--xla_cpu_use_onednn=true`) with the
  forced host device count replaced by the spec's."""
  kept = [flag for flag in inherited.split()
          if not flag.startswith('--xla_force_host_platform_device_count')]
  if devices > 1:
    kept.append(f'--xla_force_host_platform_device_count={devices}')
  return ' '.join(kept)


def run_worker(spec: Spec, weights: Path, cpus: list[int]) -> dict:
  """Runs `spec` in a fresh process; its result, with 'error' set if it failed."""
  env = dict(os.environ)
  tunables = FRAMEWORKS[spec.framework][1]
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  else:
    env.pop('GLIBC_TUNABLES', None)
  flags = xla_flags(env.get('XLA_FLAGS', ''), spec.devices)
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  command = _worker_command('--worker', json.dumps(dataclasses.asdict(spec)), str(weights),
                            ','.join(map(str, cpus)))
  start = time.perf_counter()
  with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as worker:
    try:
      stdout, stderr = worker.communicate(timeout=WORKER_TIMEOUT_S)
    except BaseException as e:  # the timeout, or the run interrupted (SIGTERM, Ctrl-C)
      # Killed and reaped before going on: subprocess.run waits only 0.25 s for a worker it
      # killed on an interrupt, and a large one can take longer to exit under load.
      worker.kill()
      worker.wait()
      if isinstance(e, subprocess.TimeoutExpired):
        return {'error': f'timed out after {WORKER_TIMEOUT_S} s'}
      raise
  lines = [l for l in stdout.splitlines() if l.startswith(RESULT_PREFIX)]
  if worker.returncode or not lines:
    # The exception's own line, not the hints some libraries print after it.
    errors = [l for l in stderr.splitlines() if 'Error' in l] or stderr.splitlines()
    return {'error': f'exit code {worker.returncode}: {(errors or ["(no output)"])[-1][:300]}'}
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  result['wall_s'] = time.perf_counter() - start
  if 'seconds' in result and spec.task in ('train', 'infer'):
    seconds = result['seconds']
    result.update(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
                  images_per_s=spec.batch / statistics.median(seconds))
  return result
