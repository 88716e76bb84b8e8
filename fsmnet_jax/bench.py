"""fsmnet-bench: FSMNet in JAX against its PyTorch twin (torch_port) on this machine.

Each measurement runs in a process of its own, so that its peak memory is its own and neither
framework's thread pools or allocator state leak into the other's. Every process is pinned to
the same CPUs and thread count, loads the same weights (one Flax initialisation, converted
with `torch_port.convert.flax_to_torch`) and the same inputs. Compilation and warm-up are
excluded from the timings (JAX compile time is reported on its own); each figure is the median
of `--repeats` timed runs, with their range.

PyTorch runs twice: with glibc's default malloc, and with the tuned one of
`GLIBC_TUNABLES=...mmap_max=0...` (large activations otherwise go back to the kernel every step).

On a GPU both frameworks run float32 models with TF32 tensor-core convolutions and matmuls: XLA's
default, and PyTorch's for convolutions (its matmuls are set to match); 'tuned' PyTorch also
autotunes its cuDNN convolutions there, as XLA does. `--bf16` adds JAX rows with the training
config's bfloat16 compute (`config.train.compute_dtype`).

  fsmnet-bench                        # the headline table (paper model, 240 px), < 10 min on 2 cores
  fsmnet-bench --json bench.json      # the same, every figure also in a JSON file
  fsmnet-bench --sweep size --sweep batch --sweep devices   # how time grows
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from fsmnet_jax.files import write_atomically

TUNED_MALLOC = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
MODELS = {  # FSMNet attributes; 'paper' is the reference's network
    'paper': {},
    'tiny': {'num_features': 8, 'num_res_blocks': 1, 'num_heads': 2},
}
FRAMEWORKS = {  # name -> (library, glibc tunables, torch.compile)
    'jax': ('jax', '', False),
    'torch': ('torch', '', False),
    'torch-tuned': ('torch', TUNED_MALLOC, False),
    'torch-compile': ('torch', TUNED_MALLOC, True),
}
FRAMEWORK_TITLES = {'jax': 'JAX (jit)', 'torch': 'PyTorch eager',
                    'torch-tuned': 'PyTorch eager, tuned',
                    'torch-compile': 'torch.compile, tuned'}
MATMUL_SIZES = {'cpu': 2048, 'accelerator': 8192}  # large enough to reach each one's peak
WORKER_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Spec:
  """One measurement: `task` in 'train' (forward + backward + clipping + AdamW), 'infer',
  'matmul' (this machine's peak) or 'flops' (torch's FLOP count)."""
  framework: str
  task: str
  model: str = 'paper'
  size: int = 240
  batch: int = 1
  devices: int = 1  # forced host devices (JAX on CPU; data-parallel over them)
  dtype: str = 'float32'  # compute dtype of convolutions and matmuls (JAX only: 'bfloat16')
  micro_batches: int = 1  # JAX training step: config.train.grad_accum_steps
  repeats: int = 3
  warmup: int = 1
  group: str = 'main'

  @property
  def label(self) -> str:
    if self.task in ('matmul', 'flops'):
      return f'{self.task} {self.framework}'
    devices = f', {self.devices} devices' if self.devices > 1 else ''
    dtype = f', {self.dtype}' if self.dtype != 'float32' else ''
    micro = f', {self.micro_batches} micro-batches' if self.micro_batches > 1 else ''
    return (f'{self.task} {self.model} {self.size}px batch {self.batch}{micro}{devices}{dtype} '
            f'[{self.framework}]')


# Worker side: runs in the measured process.

def _pin_threads(cpus: list[int]) -> None:
  """Same CPUs and thread count for every framework; before jax or torch is imported."""
  os.sched_setaffinity(0, cpus)
  for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    os.environ[name] = str(len(cpus))


def _peak_rss_gib() -> float:
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed(run: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    run()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return seconds


def _matmul_result(seconds: list[float], size: int) -> dict:
  return {'seconds': seconds, 'matmul_size': size,
          'gflops_per_s': 2 * size**3 / min(seconds) / 1e9}


def _inputs(spec: Spec):
  """(target_under, aux, target), NHWC float32, the same in every process."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  shape = (spec.batch, spec.size, spec.size, 1)
  return tuple(rng.standard_normal(shape, np.float32) for _ in range(3))


def _load_weights(path: str) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  params: dict = {}
  with np.load(path) as flat:
    for key in flat.files:
      node = params
      *parents, leaf = key.split('/')
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = flat[key]
  return params


def _jax_worker(spec: Spec, weights: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  if spec.task == 'matmul':
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    size = MATMUL_SIZES['cpu' if jax.devices()[0].platform == 'cpu' else 'accelerator']
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot).lower(a, a).compile()
    return _matmul_result(_timed(lambda: matmul(a, a).block_until_ready(), 2, 5), size)

  from configs import default  # pylint: disable=import-outside-toplevel
  from fsmnet_jax import train  # pylint: disable=import-outside-toplevel
  from fsmnet_jax.model import FSMNet  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.model.update(MODELS[spec.model])
  config.data.image_size = spec.size
  config.train.batch_size = spec.batch
  config.train.compute_dtype = spec.dtype
  config.train.grad_accum_steps = spec.micro_batches
  model = FSMNet(**config.model)
  params = _load_weights(weights)
  mesh = train.make_mesh(config)
  data = NamedSharding(mesh, P('data'))
  under, aux, target = (jax.device_put(x, data) for x in _inputs(spec))
  start = time.perf_counter()
  if spec.task == 'train':
    state = train.create_train_state(config, model, mesh, params)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    batch = {'target_under': under, 'aux': aux, 'target': target}
    compiled = jax.jit(train.make_train_step(config), in_shardings=(shardings, data),
                       out_shardings=(shardings, None), donate_argnums=0
                       ).lower(state, batch).compile()

    def run():
      nonlocal state
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
  else:
    # As the training step's mixed precision: parameters and inputs in the compute dtype.
    cast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(spec.dtype), tree)
    variables = jax.device_put(cast({'params': params}), NamedSharding(mesh, P()))
    under, aux = cast((under, aux))
    compiled = jax.jit(model.apply).lower(variables, under, aux).compile()
    run = lambda: jax.block_until_ready(compiled(variables, under, aux))
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  seconds = _timed(run, spec.warmup, spec.repeats)
  # XLA's cost analysis counts a loop body once; the accumulation scan runs it per micro-batch.
  flops = float(cost.get('flops', 0.0)) * (spec.micro_batches if spec.task == 'train' else 1)
  result = {'seconds': seconds, 'compile_s': compile_s, 'device_count': jax.device_count(),
            'flops_per_image': flops / spec.batch}
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    result['peak_device_gib'] = stats.get('peak_bytes_in_use', 0) / 2**30
    result['device'] = device.device_kind
  return result


def _torch_worker(spec: Spec, weights: str, tuned: bool, use_compile: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  if device.type == 'cuda':
    # XLA's float32 default on GPUs; PyTorch already runs its convolutions this way.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = tuned
  if spec.task == 'matmul':
    size = MATMUL_SIZES['cpu' if device.type == 'cpu' else 'accelerator']
    a = torch.randn(size, size, device=device)

    def matmul():
      torch.mm(a, a)
      sync()
    return _matmul_result(_timed(matmul, 2, 5), size)

  from fsmnet_jax.model import FSMNet  # pylint: disable=import-outside-toplevel
  from torch_port import TorchFSMNet  # pylint: disable=import-outside-toplevel
  from torch_port.convert import flax_to_torch  # pylint: disable=import-outside-toplevel
  from torch_port.losses import reference_loss  # pylint: disable=import-outside-toplevel
  model = TorchFSMNet(**MODELS[spec.model])
  model.load_state_dict(flax_to_torch(_load_weights(weights), FSMNet(**MODELS[spec.model])))
  model.to(device)
  under, aux, target = (torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
                        for x in _inputs(spec))
  if spec.task == 'flops':
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    with FlopCounterMode(display=False) as counter:
      with torch.no_grad():
        model(under, aux)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
      reference_loss(model(under, aux), target).backward()
    return {'flops_per_image': forward / spec.batch,
            'train_flops_per_image': counter.get_total_flops() / spec.batch}

  net = torch.compile(model) if use_compile else model
  if spec.task == 'train':
    model.train()
    # The reference's optimiser: AdamW over the parameters that get gradients, clipping 0.01.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=1e-4)

    def run():
      optimizer.zero_grad(set_to_none=True)
      reference_loss(net(under, aux), target).backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
      optimizer.step()
      sync()
  else:
    model.eval()

    def run():
      with torch.inference_mode():
        net(under, aux)
      sync()
  result = {}
  if use_compile:
    start = time.perf_counter()
    run()
    result['compile_s'] = time.perf_counter() - start
  result['seconds'] = _timed(run, spec.warmup, spec.repeats)
  if device.type == 'cuda':
    result['peak_device_gib'] = torch.cuda.max_memory_allocated() / 2**30
    result['device'] = torch.cuda.get_device_name(device)
  return result


def _worker_main(spec_json: str, weights: str, cpus: str) -> None:
  _pin_threads([int(c) for c in cpus.split(',')])
  spec = Spec(**json.loads(spec_json))
  library, tunables, use_compile = FRAMEWORKS[spec.framework]
  if (spec.dtype != 'float32' or spec.micro_batches > 1) and library != 'jax':
    raise ValueError(f'{spec.framework}: only JAX runs {spec.dtype} or micro-batches')
  if library == 'torch':
    # JAX only converts the weights here: it must not take the accelerator from torch.
    os.environ['JAX_PLATFORMS'] = 'cpu'
  if library == 'jax':
    result = _jax_worker(spec, weights)
  else:
    result = _torch_worker(spec, weights, bool(tunables), use_compile)
  result['peak_rss_gib'] = _peak_rss_gib()
  result['threads'] = len(os.sched_getaffinity(0))
  print('BENCH_RESULT ' + json.dumps(result), flush=True)


# Parent side: plans, launches workers, reports.

def plan(quick: bool = False, frameworks: tuple[str, ...] = tuple(FRAMEWORKS),
         sweeps: tuple[str, ...] = (), repeats: int = 3, bf16: bool = False,
         micro_batched: bool = True) -> list[Spec]:
  """The measurements of one run. `quick` measures the tiny model at 16 px only: a smoke run
  of the whole machinery in about a minute, for tests. `bf16` adds JAX's mixed-precision
  training step and batched inference. `micro_batched`: JAX trains the headline model one
  image at a time, as README recommends on CPU (accelerators want the whole batch)."""
  big_model, big_size = ('tiny', 16) if quick else ('paper', 240)
  specs = []
  for framework in frameworks:
    if quick:
      rows = [('train', 'tiny', 16, 2), ('infer', 'tiny', 16, 1), ('infer', 'tiny', 16, 2)]
    else:
      rows = [('train', 'paper', 240, 4), ('train', 'tiny', 64, 4), ('infer', 'paper', 240, 1),
              ('infer', 'paper', 240, 8)]
    if FRAMEWORKS[framework][2] and not quick:
      # inductor's C++ compile of the paper model would take most of the time budget here
      rows = [row for row in rows if row[1] == 'tiny']
    rows = [(*row, 'float32') for row in rows]
    if bf16 and framework == 'jax':
      rows += [(task, model, size, batch, 'bfloat16') for task, model, size, batch, _ in rows
               if batch > 1 and model == big_model]
    # The paper model's batched calls take 10-40 s each here: one timed run fewer keeps the
    # whole default run under 10 minutes on 2 cores. On CPU one micro-batch per image is the
    # same gradient ~1.5x faster, in a quarter of the memory (batch 4, 240 px).
    micro = lambda task, model, batch: batch if micro_batched and (framework, task, model) == (
        'jax', 'train', big_model) else 1
    specs += [Spec(framework, task, model, size, batch, dtype=dtype,
                   repeats=max(2, repeats - 1) if model == 'paper' and batch > 1 else repeats,
                   micro_batches=micro(task, model, batch))
              for task, model, size, batch, dtype in rows]
  for library in sorted({FRAMEWORKS[f][0] for f in frameworks}):
    specs.append(Spec(library if library == 'jax' else 'torch-tuned', 'matmul'))
  if any(FRAMEWORKS[f][0] == 'torch' for f in frameworks):
    specs.append(Spec('torch-tuned', 'flops', big_model, big_size, 1))

  sweep_model = 'tiny' if quick else 'paper'
  sizes = (32, 64) if quick else (128, 240, 320, 480)
  batches = (1, 2) if quick else (1, 2, 4, 8, 16)
  sweep_frameworks = [f for f in ('jax', 'torch-tuned') if f in frameworks]
  sweep_repeats = max(1, repeats - 1)
  for sweep in sweeps:
    if sweep == 'size':
      specs += [Spec(f, task, sweep_model, size, 1, repeats=sweep_repeats, group='size')
                for size in sizes for task in ('infer', 'train') for f in sweep_frameworks]
    elif sweep == 'batch':
      specs += [Spec(f, 'train', sweep_model, 32 if quick else 128, batch,
                     repeats=sweep_repeats, group='batch')
                for batch in batches for f in sweep_frameworks]
    elif sweep == 'devices':
      specs += [Spec('jax', 'train', sweep_model, 32 if quick else 128, 8, devices=devices,
                     repeats=sweep_repeats, group='devices')
                for devices in ((1, 2) if quick else (1, 2, 4, 8))]
    else:
      raise ValueError(f'unknown sweep {sweep!r}: use size, batch or devices')
  return specs


def _save_weights(model: str, path: Path) -> None:
  """One Flax initialisation (PyTorch's scheme, seed 0), flattened to an .npz; on the CPU, so
  that every machine gets the same weights and this process holds no accelerator memory."""
  subprocess.run([sys.executable, '-m', 'fsmnet_jax.bench', '--init-weights', model, str(path)],
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=True)


def _init_weights_main(model: str, path: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fsmnet_jax.model import FSMNet, init_variables  # pylint: disable=import-outside-toplevel
  params = init_variables(FSMNet(**MODELS[model]), jax.random.key(0))['params']
  flat = {'/'.join(k.key for k in key_path): np.asarray(leaf)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, **flat)


def run_worker(spec: Spec, weights: Path, cpus: list[int]) -> dict:
  """Runs `spec` in a fresh process; its result, with 'error' set if it failed."""
  env = dict(os.environ)
  tunables = FRAMEWORKS[spec.framework][1]
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  else:
    env.pop('GLIBC_TUNABLES', None)
  env.pop('XLA_FLAGS', None)
  if spec.devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={spec.devices}'
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  command = [sys.executable, '-m', 'fsmnet_jax.bench', '--worker',
             json.dumps(dataclasses.asdict(spec)), str(weights), ','.join(map(str, cpus))]
  start = time.perf_counter()
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {WORKER_TIMEOUT_S} s'}
  lines = [l for l in done.stdout.splitlines() if l.startswith('BENCH_RESULT ')]
  if done.returncode or not lines:
    # The exception's own line, not the hints some libraries print after it.
    errors = [l for l in done.stderr.splitlines() if 'Error' in l] or done.stderr.splitlines()
    return {'error': f'exit code {done.returncode}: {(errors or ["(no output)"])[-1][:300]}'}
  result = json.loads(lines[-1][len('BENCH_RESULT '):])
  result['wall_s'] = time.perf_counter() - start
  if 'seconds' in result and spec.task in ('train', 'infer'):
    seconds = result['seconds']
    result.update(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
                  images_per_s=spec.batch / statistics.median(seconds))
  return result


def machine_info(cpus: list[int]) -> dict:
  info = {'date': datetime.date.today().isoformat(), 'python': platform.python_version(),
          'platform': platform.platform(), 'cpus_used': cpus, 'threads': len(cpus),
          'cpu_model': _cpu_model()}
  for package in ('jax', 'jaxlib', 'flax', 'torch'):
    try:  # the installed version, without importing it (and starting an accelerator) here
      info[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      info[package] = None
  return info


def _cpu_model() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _find(results: list[dict], **fields) -> dict | None:
  """The result of the measurement with these spec fields, if it succeeded."""
  result = _find_any(results, **fields)
  return None if result is None or 'error' in result else result


def summarize(results: list[dict]) -> dict:
  """Ratios JAX / PyTorch (throughput; > 1: JAX is faster), FLOP rates and utilisation."""
  main = [r for r in results if r['spec']['group'] == 'main']
  matmuls = [r['result'] for r in main
             if r['spec']['task'] == 'matmul' and 'error' not in r['result']]
  best = max(matmuls, key=lambda r: r['gflops_per_s'], default={})
  summary: dict[str, Any] = {'matmul_peak_gflops_per_s': best.get('gflops_per_s'),
                             'matmul_size': best.get('matmul_size'),
                             'ratios': {}, 'utilisation': {}}
  torch_flops = _find(main, task='flops')
  if torch_flops:
    summary['torch_flops_per_image'] = torch_flops
  for entry in main:
    spec, result = entry['spec'], entry['result']
    if spec['framework'] != 'jax' or spec['task'] not in ('train', 'infer') or 'error' in result:
      continue
    key = f"{spec['task']} {spec['model']} {spec['size']}px batch {spec['batch']}"
    if spec['dtype'] != 'float32':
      key += f" {spec['dtype']}"
    for other in ('torch', 'torch-tuned', 'torch-compile'):
      theirs = _find(main, framework=other, task=spec['task'], model=spec['model'],
                     size=spec['size'], batch=spec['batch'], dtype='float32')
      if theirs:
        summary['ratios'][f'{key}: JAX / {other}'] = result['images_per_s'] / theirs['images_per_s']
    flops = result.get('flops_per_image', 0.0)
    if flops:
      achieved = flops * result['images_per_s'] / 1e9
      summary['utilisation'][key] = {
          'gflop_per_image': flops / 1e9, 'achieved_gflops_per_s': achieved,
          'mfu': achieved / summary['matmul_peak_gflops_per_s']
                 if summary['matmul_peak_gflops_per_s'] else None}
  return summary


def _cell(result: dict | None, batch: int) -> str:
  if result is None:
    return '–'
  if 'error' in result:
    return 'failed'
  low, high = batch / result['max_s'], batch / result['min_s']
  return f"{result['images_per_s']:.3g} ({low:.3g}–{high:.3g})"


def format_report(results: list[dict], summary: dict, info: dict) -> str:
  """Markdown tables: throughput per framework, then memory, compile time, FLOPs; sweeps."""
  accelerators = sorted({r['result']['device'] for r in results if 'device' in r['result']})
  on = f" and {', '.join(accelerators)} (TF32 float32 arithmetic)" if accelerators else ''
  lines = [f"fsmnet-bench, {info['date']}: {info['cpu_model']}, {info['threads']} threads "
           f"(CPUs {info['cpus_used']}){on}; jax {info['jax']}, flax {info['flax']}, "
           f"torch {info['torch']}, Python {info['python']}.", '']
  main = [r for r in results if r['spec']['group'] == 'main']
  frameworks = [f for f in FRAMEWORKS if any(r['spec']['framework'] == f
                                              and r['spec']['task'] in ('train', 'infer')
                                              for r in main)]
  rows = []
  for entry in main:
    spec = entry['spec']
    if spec['task'] in ('train', 'infer'):
      row = (spec['task'], spec['model'], spec['size'], spec['batch'], spec['dtype'])
      if row not in rows:
        rows.append(row)
  if not rows:  # a sweeps-only run
    return '\n'.join(lines + _failure_lines(results) + _sweep_tables(results))
  header = ['images/s, median (range)'] + [FRAMEWORK_TITLES[f] for f in frameworks]
  ratio_columns = [f for f in frameworks if f != 'jax']
  header += [f'JAX / {FRAMEWORK_TITLES[f]}' for f in ratio_columns if 'jax' in frameworks]
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  memory_lines, device_memory_lines, compile_lines = [], [], []
  for task, model, size, batch, dtype in rows:
    fields = dict(task=task, model=model, size=size, batch=batch, dtype=dtype)
    cells = {f: _find_any(main, framework=f, **fields) for f in frameworks}
    name = ('train step' if task == 'train' else 'inference') + f', {model} {size}px, batch {batch}'
    if dtype != 'float32':
      name += f', {dtype}'
    line = [name] + [_cell(cells[f], batch) for f in frameworks]
    if 'jax' in frameworks:
      for f in ratio_columns:
        ok = cells['jax'] and cells[f] and 'error' not in cells['jax'] and 'error' not in cells[f]
        line.append(f"{cells['jax']['images_per_s'] / cells[f]['images_per_s']:.2f}x" if ok
                    else '–')
    lines.append('| ' + ' | '.join(line) + ' |')
    for table, field in ((memory_lines, 'peak_rss_gib'), (device_memory_lines, 'peak_device_gib')):
      table.append('| ' + ' | '.join(
          [name] + [f"{cells[f][field]:.2f}" if cells[f] and field in cells[f] else '–'
                    for f in frameworks]) + ' |')
    compile_cells = [f"{cells[f]['compile_s']:.1f}" if cells[f] and 'compile_s' in cells[f]
                     else '–' for f in frameworks]
    compile_lines.append('| ' + ' | '.join([name] + compile_cells) + ' |')
  titles = [FRAMEWORK_TITLES[f] for f in frameworks]
  lines += ['', '| peak host RSS, GiB | ' + ' | '.join(titles) + ' |',
            '|' + '---|' * (len(titles) + 1), *memory_lines]
  if accelerators:
    lines += ['', '| peak device memory, GiB | ' + ' | '.join(titles) + ' |',
              '|' + '---|' * (len(titles) + 1), *device_memory_lines]
  lines += ['', '| compile / first call, s | ' + ' | '.join(titles) + ' |',
            '|' + '---|' * (len(titles) + 1), *compile_lines]
  micro = sorted({(r['spec']['batch'], r['spec']['micro_batches']) for r in main
                  if r['spec']['micro_batches'] > 1})
  for batch, count in micro:
    lines += ['', f'JAX trains batch {batch} as {count} micro-batches '
                  f'(config.train.grad_accum_steps={count}): the same gradient, accumulated.']
  peak = summary['matmul_peak_gflops_per_s']
  size = summary['matmul_size']
  lines += ['', f"Matmul peak ({size}x{size} float32, best of both frameworks): "
                f"{peak:.0f} GFLOP/s." if peak else 'Matmul peak: not measured.']
  flops = summary.get('torch_flops_per_image')
  if flops:
    lines.append(f"torch FlopCounterMode at the first row's model and size: forward "
                 f"{flops['flops_per_image'] / 1e9:.1f} GFLOP/image, training step "
                 f"{flops['train_flops_per_image'] / 1e9:.1f} GFLOP/image.")
  if summary['utilisation']:
    lines += ['', '| JAX (XLA cost analysis) | GFLOP/image | achieved GFLOP/s | MFU |',
              '|---|---|---|---|']
    for key, value in summary['utilisation'].items():
      mfu = f"{100 * value['mfu']:.0f}%" if value['mfu'] is not None else '–'
      lines.append(f"| {key} | {value['gflop_per_image']:.1f} | "
                   f"{value['achieved_gflops_per_s']:.0f} | {mfu} |")
  return '\n'.join(lines + _failure_lines(results) + _sweep_tables(results))


def _failure_lines(results: list[dict]) -> list[str]:
  failures = [f"{entry['spec']['framework']} ({entry['spec']['task']} {entry['spec']['model']} "
              f"{entry['spec']['size']}px): {entry['result']['error']}"
              for entry in results if 'error' in entry['result']]
  return ['', 'Failed measurements:', *(f'- {failure}' for failure in failures)] if failures else []


def _find_any(results: list[dict], **fields) -> dict | None:
  """The result of the measurement with these spec fields, failed ones included."""
  for entry in results:
    if all(entry['spec'][k] == v for k, v in fields.items()):
      return entry['result']
  return None


def _sweep_tables(results: list[dict]) -> list[str]:
  lines = []
  titles = {'size': ('image size', 'size'), 'batch': ('batch size', 'batch'),
            'devices': ('forced host devices', 'devices')}
  for group, (title, field) in titles.items():
    entries = [r for r in results if r['spec']['group'] == group]
    if not entries:
      continue
    lines += ['', f'| {title} | task | framework | s per call, median (range) | images/s | '
                  f'peak RSS GiB |', '|---|---|---|---|---|---|']
    for entry in entries:
      spec, result = entry['spec'], entry['result']
      if 'error' in result:
        lines.append(f"| {spec[field]} | {spec['task']} | {spec['framework']} | failed: "
                     f"{result['error'][:80]} | – | – |")
        continue
      lines.append(f"| {spec[field]} | {spec['task']} {spec['model']} {spec['size']}px "
                   f"b{spec['batch']} | {FRAMEWORK_TITLES[spec['framework']]} | "
                   f"{result['median_s']:.3g} ({result['min_s']:.3g}–{result['max_s']:.3g}) | "
                   f"{result['images_per_s']:.3g} | {result['peak_rss_gib']:.2f} |")
  return lines


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['--worker']:
    _worker_main(*argv[1:])
    return 0
  if argv[:1] == ['--init-weights']:
    _init_weights_main(*argv[1:])
    return 0
  parser = argparse.ArgumentParser(
      prog='fsmnet-bench', description=__doc__.split('\n\n')[0],
      epilog='Each measurement runs in its own process; the report is Markdown on stdout.')
  parser.add_argument('--json', type=Path, help='also write every figure to this JSON file')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
  parser.add_argument('--threads', type=int, default=0,
                      help='CPUs to pin every process to (default: all available)')
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS),
                      help=f'comma-separated subset of {", ".join(FRAMEWORKS)}')
  parser.add_argument('--sweep', action='append', default=[], choices=('size', 'batch', 'devices'),
                      help='add a scaling sweep (repeatable); sweeps only, no headline table, '
                           'unless --with-main')
  parser.add_argument('--with-main', action='store_true',
                      help='with --sweep: measure the headline table too')
  parser.add_argument('--bf16', action='store_true',
                      help='add JAX rows with bfloat16 compute (training step and batched '
                           'inference of the headline model)')
  parser.add_argument('--whole-batch', action='store_true',
                      help='JAX trains the headline model on the whole batch, as on GPUs (by '
                           'default one micro-batch per image, the faster way on CPU)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny model at 16 px everywhere: checks the machinery in a minute')
  args = parser.parse_args(argv)
  frameworks = tuple(f for f in args.frameworks.split(',') if f)
  unknown = [f for f in frameworks if f not in FRAMEWORKS]
  if unknown or not frameworks:
    parser.error(f'--frameworks: unknown {unknown}; choose from {", ".join(FRAMEWORKS)}')
  if args.repeats < 1:
    parser.error('--repeats must be at least 1')
  available = sorted(os.sched_getaffinity(0))
  if not 0 <= args.threads <= len(available):
    parser.error(f'--threads must be between 1 and the {len(available)} CPUs available')
  cpus = available[:args.threads or len(available)]
  if args.json and args.json.exists() and not args.json.is_file():
    parser.error(f'--json {args.json}: not a file')

  specs = plan(args.quick, frameworks, tuple(args.sweep), args.repeats, args.bf16,
               micro_batched=not args.whole_batch)
  if args.sweep and not args.with_main:
    specs = [s for s in specs if s.group != 'main']
  info = machine_info(cpus)
  print(f"fsmnet-bench: {len(specs)} measurements, {len(cpus)} threads on CPUs {cpus}",
        file=sys.stderr, flush=True)
  results: list[dict] = []
  start = time.perf_counter()
  # A run stopped part-way (Ctrl-C, `timeout`, a batch system's SIGTERM) still reports, and
  # its JSON keeps, every measurement it finished; the worker in flight is killed.
  previous_handler = signal.signal(signal.SIGTERM, _interrupt)
  try:
    with tempfile.TemporaryDirectory(prefix='fsmnet-bench-') as tmp:
      weights = {}
      for model in sorted({s.model for s in specs}):
        weights[model] = Path(tmp) / f'{model}.npz'
        _save_weights(model, weights[model])
      for spec in specs:
        result = run_worker(spec, weights[spec.model], cpus)
        status = result.get('error') or (
            f"{result['median_s']:.3g} s median" if 'median_s' in result else 'done')
        print(f"  {spec.label}: {status} ({result.get('wall_s', 0):.0f} s)", file=sys.stderr,
              flush=True)
        results.append({'spec': dataclasses.asdict(spec), 'result': result})
        info['total_s'] = time.perf_counter() - start
        if args.json:
          _write_json(args.json, info, results)
    info['interrupted'] = False
  except KeyboardInterrupt:
    info['interrupted'] = True
    print(f'fsmnet-bench: interrupted after {len(results)} of {len(specs)} measurements',
          file=sys.stderr, flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  info['total_s'] = time.perf_counter() - start
  report = format_report(results, summarize(results), info)
  if args.json:
    _write_json(args.json, info, results)
  print(report)
  print(f"\n(total {info['total_s']:.0f} s{', interrupted' if info['interrupted'] else ''})")
  # torch.compile is measured where it works; its failure is a finding, not a benchmark error.
  return 1 if info['interrupted'] or any(
      'error' in r['result'] and r['spec']['framework'] != 'torch-compile' for r in results) else 0


def _interrupt(signum: int, frame: Any) -> None:
  raise KeyboardInterrupt(f'signal {signum}')


def _write_json(path: Path, info: dict, results: list[dict]) -> None:
  text = json.dumps({'machine': info, 'summary': summarize(results), 'results': results},
                    indent=2) + '\n'
  write_atomically(path, lambda temporary: temporary.write_text(text), overwrite=True)


def run() -> None:
  sys.exit(main())


if __name__ == '__main__':
  run()
