"""Worker side of fsmnet-bench: one measurement in this process (`python -m fsmnet_bench.workers`).

  python -m fsmnet_bench.workers --worker SPEC_JSON WEIGHTS CPUS   # prints RESULT_PREFIX + JSON
  python -m fsmnet_bench.workers --init-weights MODEL WEIGHTS

NumPy, jax and torch are imported only once the process is pinned to CPUS, so that their thread
pools size themselves to them.
"""
# pylint: disable=import-outside-toplevel

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fsmnet_bench import profile
from fsmnet_bench.launch import RESULT_PREFIX
from fsmnet_bench.plan import FRAMEWORKS, MODELS, XLA_CONVOLUTIONS, Spec
from fsmnet_jax.configs import default

MATMUL_SIZES = {'cpu': 2048, 'accelerator': 8192}  # large enough to reach each one's peak


def _pin_threads(cpus: list[int]) -> None:
  """Same CPUs and thread count for every framework; before jax or torch is imported."""
  os.sched_setaffinity(0, cpus)
  for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    os.environ[name] = str(len(cpus))


def _timed(run: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `run`, after `warmup` untimed ones."""
  for _ in range(warmup):
    run()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    seconds.append(time.perf_counter() - start)
  return seconds


def _matmul_result(seconds: list[float], size: int) -> dict:
  """The timings of size x size float32 matmuls and the best rate, GFLOP/s."""
  return {'seconds': seconds, 'matmul_size': size,
          'gflops_per_s': 2 * size**3 / min(seconds) / 1e9}


def _inputs(spec: Spec) -> tuple:
  """(target_under, aux, target), NHWC float32, the same in every process."""
  import numpy as np
  rng = np.random.default_rng(0)
  shape = (spec.batch, spec.size, spec.size, 1)
  return tuple(rng.standard_normal(shape, np.float32) for _ in range(3))


def _init_weights(model: str, path: str) -> None:
  """Writes the Flax parameters of `model`, seed 0, to `path` (msgpack)."""
  import jax
  from flax import serialization
  from fsmnet_jax.model import FSMNet, init_variables
  params = init_variables(FSMNet(**MODELS[model]), jax.random.key(0))['params']
  Path(path).write_bytes(serialization.to_bytes(params))


def _load_weights(path: str) -> dict:
  """The parameters `_init_weights` wrote, as NumPy arrays."""
  from flax import serialization
  return serialization.msgpack_restore(Path(path).read_bytes())


def _jax_worker(spec: Spec, weights: str) -> dict:
  """Compiles and times the JAX training step (as fsmnet-train's) or inference."""
  import jax
  if spec.task == 'matmul':
    import jax.numpy as jnp
    size = MATMUL_SIZES['cpu' if jax.devices()[0].platform == 'cpu' else 'accelerator']
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(jnp.dot).lower(a, a).compile()
    return _matmul_result(_timed(lambda: matmul(a, a).block_until_ready(), 2, 5), size)

  from fsmnet_jax import conv, mesh as mesh_lib, train
  from fsmnet_jax.model import FSMNet, apply_in_dtype
  from fsmnet_jax.throughput import compiled_flops
  config = default.get_config()
  config.model.update(MODELS[spec.model])
  config.data.image_size = spec.size
  config.train.batch_size = spec.batch
  config.train.compute_dtype = spec.dtype
  config.train.grad_accum_steps = spec.micro_batches
  model = FSMNet(**config.model)
  params = _load_weights(weights)
  mesh = train.make_mesh(config)
  data = mesh_lib.rows(mesh)
  under, aux, target = (jax.device_put(x, data) for x in _inputs(spec))
  convolutions = (conv.XLA_NATIVE if spec.framework in XLA_CONVOLUTIONS
                  else mesh_lib.platform(mesh))
  start = time.perf_counter()
  if spec.task == 'train':
    state = train.create_train_state(config, model, mesh, params)
    batch = {'target_under': under, 'aux': aux, 'target': target}
    compiled = train.jit_train_step(config, mesh, state, convolutions).lower(
        state, batch).compile()

    def run():
      nonlocal state
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
  else:
    # As the training step's mixed precision and --precision bf16: parameters and inputs in
    # the compute dtype.
    params = jax.device_put(jax.tree_util.tree_map(lambda x: x.astype(spec.dtype), params),
                            mesh_lib.replicated(mesh))
    apply = conv.specialized_for(convolutions, model.apply)
    forward = lambda params, under, aux: apply_in_dtype(apply, params, under, aux, spec.dtype)
    compiled = jax.jit(forward).lower(params, under, aux).compile()
    run = lambda: jax.block_until_ready(compiled(params, under, aux))
  compile_s = time.perf_counter() - start
  seconds = _timed(run, spec.warmup, spec.repeats)
  flops = compiled_flops(compiled, spec.micro_batches if spec.task == 'train' else 1) or 0.0
  result = {'seconds': seconds, 'compile_s': compile_s, 'device_count': jax.device_count(),
            'flops_per_image': flops / spec.batch}
  if spec.profile:
    result.update(profile.jax_profile(compiled, run))
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    result['peak_device_gib'] = stats.get('peak_bytes_in_use', 0) / 2**30
    result['device'] = device.device_kind
  return result


def _torch_worker(spec: Spec, weights: str, tuned: bool, use_compile: bool) -> dict:
  """Times TorchFSMNet's training step (the reference's loss and optimiser) or inference."""
  import torch
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

  from fsmnet_jax.model import FSMNet
  from torch_port import TorchFSMNet
  from torch_port.convert import flax_to_torch
  from torch_port.losses import reference_loss
  from torch_port.model import from_nhwc
  model = TorchFSMNet(**MODELS[spec.model])
  model.load_state_dict(flax_to_torch(_load_weights(weights), FSMNet(**MODELS[spec.model])))
  model.to(device)
  under, aux, target = (from_nhwc(x).to(device) for x in _inputs(spec))
  if spec.task == 'flops':
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      with torch.no_grad():
        model(under, aux)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
      reference_loss(model(under, aux), target).backward()
    return {'flops_per_image': forward / spec.batch,
            'train_flops_per_image': counter.get_total_flops() / spec.batch}

  net = torch.compile(model) if use_compile else model
  # bfloat16: PyTorch's mixed precision, autocast (its FFTs stay float32).
  autocast = lambda: torch.autocast(device.type, torch.bfloat16,
                                    enabled=spec.dtype == 'bfloat16')
  if spec.task == 'train':
    model.train()
    # The training config's optimiser (the reference's): clipping, then AdamW.
    hyper = default.get_config().train
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyper.learning_rate,
                                  betas=(hyper.b1, hyper.b2), weight_decay=hyper.weight_decay)

    def run():
      optimizer.zero_grad(set_to_none=True)
      with autocast():
        loss = reference_loss(net(under, aux), target)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), hyper.clip_norm)
      optimizer.step()
      sync()
  else:
    model.eval()

    def run():
      with torch.inference_mode(), autocast():
        net(under, aux)
      sync()
  result = {}
  if use_compile:
    start = time.perf_counter()
    run()
    result['compile_s'] = time.perf_counter() - start
  result['seconds'] = _timed(run, spec.warmup, spec.repeats)
  if spec.profile:
    result.update(profile.torch_profile(run))
  if device.type == 'cuda':
    result['peak_device_gib'] = torch.cuda.max_memory_allocated() / 2**30
    result['device'] = torch.cuda.get_device_name(device)
  return result


def measure(spec_json: str, weights: str, cpus: str) -> None:
  """Pins this process to `cpus` (comma-separated), runs the Spec and prints its result."""
  _pin_threads([int(c) for c in cpus.split(',')])
  spec = Spec(**json.loads(spec_json))
  library, tunables, use_compile = FRAMEWORKS[spec.framework]
  if spec.micro_batches > 1 and library != 'jax':
    raise ValueError(f'{spec.framework}: only JAX runs micro-batches')
  if library == 'jax':
    result = _jax_worker(spec, weights)
  else:
    # JAX only converts the weights here: it must not take the accelerator from torch.
    os.environ['JAX_PLATFORMS'] = 'cpu'
    result = _torch_worker(spec, weights, bool(tunables), use_compile)
  result['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB
  result['threads'] = len(os.sched_getaffinity(0))
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
  """Runs `--worker SPEC_JSON WEIGHTS CPUS` or `--init-weights MODEL WEIGHTS`."""
  commands = {'--worker': measure, '--init-weights': _init_weights}
  if not argv or argv[0] not in commands:
    sys.exit(__doc__)
  commands[argv[0]](*argv[1:])


if __name__ == '__main__':
  main(sys.argv[1:])
