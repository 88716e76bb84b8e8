"""Training: one sharded, jitted train step; orbax checkpoints with exact resume; evaluation.

`train_and_evaluate(config, workdir)` is the library entry (`fsmnet-train` calls it). The mesh
has a `data` axis over which batches are split and a `model` axis (size `config.mesh.model`,
1 by default) left for model parallelism; parameters are replicated, the optimizer state too
unless `config.train.shard_optimizer_state`. A run stopped any way (its end, SIGTERM/SIGINT,
kill -9) resumes from the latest complete checkpoint in `workdir` and continues bit for bit.
"""

import functools
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fsmnet_jax import conv, evaluate, losses, mesh as mesh_lib, optim
from fsmnet_jax.checkpoint import TRAIN_CHECKPOINT_DIR, TrainCheckpoints, describe_error
from fsmnet_jax.data import masks, pipeline
from fsmnet_jax.files import StagedFolder, StoragePath, as_path, is_url, write_atomically
from fsmnet_jax.model import (MODEL_NAMES, abstract_params, apply_in_dtype, build_model,
                              init_variables, size_multiple)
from fsmnet_jax.reporting import MetricWriter, ProgressBar
from fsmnet_jax.throughput import Throughput, compiled_flops, peak_flops

# 'float64' (parameters too; needs JAX_ENABLE_X64=1) is for parity with the reference.
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}
SCHEDULE_DECAY = {'reference': 0.5, 'paper': 0.1, 'constant': 1.0}
NONFINITE_POLICIES = ('stop', 'skip')
TRAIN_KEYS = ('target_under', 'aux', 'target')
BEST_METRIC = 'eval_psnr'
PROFILE_DIR = 'profile'


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the key."""


class NonFiniteStepError(FloatingPointError):
  """Training stopped at a step whose loss or gradients were not finite; the message names
  the step and the slices of its batch."""


class TrainState(train_state.TrainState):
  """Flax's TrainState plus an EMA of the parameters (None without EMA) and the run's RNG."""
  ema_params: Any
  rng: jax.Array


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """All devices of all processes as a (data, model) mesh of `config.mesh.model` columns."""
  try:
    return mesh_lib.make_mesh(jax.devices(), config.mesh.model)
  except ValueError as e:
    raise ConfigError(f'config.mesh.model={config.mesh.model}: {e}') from e


def check_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ConfigError for settings that cannot run on `mesh`, before any data or compute."""
  check_settings(config, mesh.shape['data'], jax.process_count())


def check_settings(config: ml_collections.ConfigDict, data_size: int = 1, processes: int = 1
                   ) -> None:
  """`check_config` for a data axis of `data_size` devices over `processes` processes, without
  touching a device (a launcher checks its runs' config with it)."""
  train, size = config.train, config.data.image_size
  problems = []
  if config.model_name not in MODEL_NAMES:
    problems.append(f'config.model_name={config.model_name!r}: use one of '
                    f'{", ".join(MODEL_NAMES)}')
  elif size % size_multiple(config.model_name):
    problems.append(f'config.data.image_size={size} must be divisible by '
                    f'{size_multiple(config.model_name)} (the 2x downsamplings of '
                    f'{config.model_name})')
  for key, batch in (('train.batch_size', train.batch_size),
                     ('eval.batch_size', config.eval.batch_size)):
    if batch < 1 or batch % data_size or batch % processes:
      problems.append(f'config.{key}={batch} must be a positive multiple of the {data_size} '
                      f'devices of the data axis ({processes} process(es))')
  per_device = train.batch_size // max(data_size, 1)
  if train.grad_accum_steps < 1 or per_device % train.grad_accum_steps:
    problems.append(f'config.train.grad_accum_steps={train.grad_accum_steps} must divide the '
                    f'per-device batch ({per_device})')
  if config.data.mask_type not in masks.SAMPLING_MASK_TYPES:
    problems.append(f'config.data.mask_type={config.data.mask_type!r}: use one of '
                    f'{", ".join(masks.SAMPLING_MASK_TYPES)}')
  if not config.data.acceleration > 1:
    problems.append(f'config.data.acceleration={config.data.acceleration} must be above 1 (the '
                    'undersampling factor)')
  if train.schedule not in SCHEDULE_DECAY:
    problems.append(f'config.train.schedule={train.schedule!r}: use one of '
                    f'{", ".join(SCHEDULE_DECAY)}')
  if train.compute_dtype not in COMPUTE_DTYPES:
    problems.append(f'config.train.compute_dtype={train.compute_dtype!r}: use one of '
                    f'{", ".join(COMPUTE_DTYPES)}')
  elif train.compute_dtype == 'float64' and not jax.config.jax_enable_x64:
    problems.append("config.train.compute_dtype='float64' needs 64-bit JAX: set "
                    "JAX_ENABLE_X64=1")
  if train.on_nonfinite not in NONFINITE_POLICIES:
    problems.append(f'config.train.on_nonfinite={train.on_nonfinite!r}: use one of '
                    f'{", ".join(NONFINITE_POLICIES)}')
  if not 0 <= train.ema_decay < 1:
    problems.append(f'config.train.ema_decay={train.ema_decay} must be in [0, 1)')
  for key in ('train.num_steps', 'train.log_every', 'train.checkpoint_every', 'eval.every',
              'train.keep_checkpoints', 'train.max_consecutive_skips',
              'train.signal_check_every'):
    section, name = key.split('.')
    if config[section][name] < 1:
      problems.append(f'config.{key}={config[section][name]} must be at least 1')
  profile = tuple(train.profile_steps)
  if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
    problems.append(f'config.train.profile_steps={profile}: (first, last) steps, 1 <= first <= '
                    'last, or () for none')
  if train.peak_tflops < 0:
    problems.append(f'config.train.peak_tflops={train.peak_tflops} must be at least 0')
  if problems:
    raise ConfigError('; '.join(problems))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Step decay: x0.5 ('reference', the code) or x0.1 ('paper') every `decay_every` steps.

  In JAX's default float type: optax computes it in float32 from an int32 step count, which
  would round a float64 run's learning rate (2e-3 by 4.8e-8) and every update with it.
  """
  schedule = optax.exponential_decay(config.learning_rate, config.decay_every,
                                     SCHEDULE_DECAY[config.schedule], staircase=True)
  return lambda step: schedule(jnp.asarray(step, jnp.result_type(float)))


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh,
                       params: Any = None) -> TrainState:
  """The initial state, placed on `mesh`: `params` if given, else PyTorch's initialisation
  from `config.seed`."""
  init_rng, run_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if params is None:
    params = init_variables(model, init_rng)['params']
  state = _new_state(config, model, params, run_rng)
  shardings = state_shardings(state, mesh, config.train.shard_optimizer_state)
  return jax.tree_util.tree_map(_place, state, shardings)


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, mesh: Mesh
                         ) -> TrainState:
  """create_train_state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct`s), without
  computing it: what a resumed run restores into. The initialisation runs op by op, ~35 s of a
  first start on a new machine for the tiny model (2-core Zen 3); this traces it (2-6 s)."""
  state = jax.eval_shape(functools.partial(_new_state, config, model), abstract_params(model),
                         jax.random.PRNGKey(config.seed))
  shardings = state_shardings(state, mesh, config.train.shard_optimizer_state)
  return jax.tree_util.tree_map(
      lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      state, shardings)


def _new_state(config: ml_collections.ConfigDict, model: nn.Module, params: Any,
               rng: jax.Array) -> TrainState:
  if config.train.compute_dtype == 'float64':  # parameters and optimizer state too
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
  tx = optim.reference_optimizer(learning_rate_schedule(config.train),
                                 optim.parameter_labels(params, model),
                                 clip_norm=config.train.clip_norm or None, b1=config.train.b1,
                                 b2=config.train.b2, weight_decay=config.train.weight_decay)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                            ema_params=params if config.train.ema_decay else None, rng=rng)
  return state.replace(step=jnp.zeros((), jnp.int32))


def state_shardings(state: TrainState, mesh: Mesh, shard_optimizer_state: bool) -> TrainState:
  """Replicated everywhere; with `shard_optimizer_state`, each optimizer-state array split
  over `data` along its first axis the data axis divides (FSDP-style: 1/N of Adam's moments
  per device, gathered by XLA where the update needs them)."""
  replicated = mesh_lib.replicated(mesh)
  shardings = jax.tree_util.tree_map(lambda _: replicated, state)
  if not shard_optimizer_state:
    return shardings
  data_size = mesh.shape['data']

  def split(x):
    for axis, length in enumerate(np.shape(x)):
      if length % data_size == 0 and length >= data_size:
        return NamedSharding(mesh, P(*([None] * axis), 'data'))
    return replicated

  return shardings.replace(opt_state=jax.tree_util.tree_map(split, state.opt_state))


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
  # Every process holds the same host value; each puts the pieces its own devices own.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def micro_batch_loss(apply_fn: Callable, params: Any, micro_batch: dict[str, jax.Array], *,
                     compute_dtype: jnp.dtype, rng: jax.Array
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The reference loss and its terms on one micro-batch, the network run in `compute_dtype`.

  Mixed precision: bfloat16 copies of the float32 parameters and inputs; the FFT blocks compute
  in float32 themselves, and the loss is taken in the parameters' dtype (float32, or float64).
  """
  loss_dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
  outputs = apply_in_dtype(apply_fn, params, micro_batch['target_under'], micro_batch['aux'],
                           compute_dtype, rngs={'dropout': rng})
  outputs = {k: v.astype(loss_dtype) for k, v in outputs.items()}
  # The target too: batches come as float32, and a float32 FFT of the target would put float32
  # rounding into a float64 loss.
  return losses.reference_loss(outputs, micro_batch['target'].astype(loss_dtype))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, accum_steps: int,
               compute_dtype: jnp.dtype, ema_decay: float, schedule: optax.Schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch: the reference loss, its gradient (accumulated over
  `accum_steps` micro-batches), clipping and AdamW, and the EMA.

  A step whose loss or gradient norm is not finite changes nothing but the step count (its
  metrics say `finite` False), so a NaN never reaches the parameters, the optimizer state or a
  checkpoint; the training loop decides whether to go on.
  """
  loss_fn = functools.partial(micro_batch_loss, state.apply_fn, compute_dtype=compute_dtype,
                              rng=jax.random.fold_in(state.rng, state.step))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, terms), grads = grad_fn(state.params, batch)
  else:
    # Micro-batch i takes rows i, i + A, i + 2A, ...: every device keeps its own rows.
    micro_batches = jax.tree_util.tree_map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(totals, micro_batch):
      (loss, terms), grads = grad_fn(state.params, micro_batch)
      return jax.tree_util.tree_map(jnp.add, totals, (loss, terms, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(state.params, jax.tree_util.tree_map(lambda x: x[0], micro_batches))))
    (loss, terms), grads = zeros
    totals, _ = jax.lax.scan(accumulate, (loss, terms, grads), micro_batches)
    loss, terms, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, totals)

  new_state = state.apply_gradients(grads=grads)
  if ema_decay:
    new_state = new_state.replace(ema_params=jax.tree_util.tree_map(
        lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, new_state.params))
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A select, not lax.cond: no host round trip for the predicate on GPUs.
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old),
                                     new_state, state.replace(step=new_state.step))
  step_metrics = {'loss': loss, **terms, 'grad_norm': grad_norm,
                  'learning_rate': schedule(state.step), 'finite': finite}
  return new_state, step_metrics


def make_train_step(config: ml_collections.ConfigDict, platform: str | None) -> Callable:
  """`train_step` with the static settings of `config.train` bound, to be jitted for devices
  of `platform` (`mesh.platform`; None: any)."""
  return conv.specialized_for(platform, functools.partial(
      train_step, accum_steps=config.train.grad_accum_steps,
      compute_dtype=COMPUTE_DTYPES[config.train.compute_dtype], ema_decay=config.train.ema_decay,
      schedule=learning_rate_schedule(config.train)))


def jit_train_step(config: ml_collections.ConfigDict, mesh: Mesh, state: TrainState,
                   platform: str | None = None) -> Callable:
  """The step fsmnet-train runs: `make_train_step` jitted for batches split over `mesh`'s
  `data` axis and `state`'s shardings, the state donated. Its convolutions are those of
  `platform` (default: the mesh's devices'): a GPU's, say, to study on host devices the
  program a GPU would run."""
  shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  return jax.jit(make_train_step(config, platform or mesh_lib.platform(mesh)),
                 in_shardings=(shardings, mesh_lib.rows(mesh)), out_shardings=(shardings, None),
                 donate_argnums=0)


class _NonFiniteGuard:
  """Applies `config.train.on_nonfinite` to steps whose update was dropped as non-finite.

  Each step's flag is read once the next step is queued, so the host never waits on the step
  in flight; `flush()` settles the last one (before anything is logged or saved).
  'stop' raises NonFiniteStepError; 'skip' warns and goes on, and raises after more than
  `max_consecutive` skips in a row (a diverged run, not a bad batch).
  """

  def __init__(self, policy: str, max_consecutive: int, source: Any, checkpoint_dir: StoragePath):
    self._policy, self._max_consecutive = policy, max_consecutive
    self._source, self._checkpoint_dir = source, checkpoint_dir
    self._pending, self._consecutive = None, 0

  def watch(self, step: int, finite: jax.Array, batch: dict[str, np.ndarray]) -> None:
    self.flush()
    self._pending = (step, finite, batch)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, finite, batch = self._pending
    self._pending = None
    if bool(finite):
      self._consecutive = 0
      return
    self._consecutive += 1
    where = f'step {step} (this process\'s batch: {self._describe(batch)})'
    if self._policy == 'stop' or self._consecutive > self._max_consecutive:
      repeated = ('' if self._policy == 'stop' else
                  f'{self._consecutive} steps in a row, the last ')
      raise NonFiniteStepError(
          f'non-finite loss or gradients {repeated}at {where}; stopped without saving it. '
          f'The last checkpoint in {self._checkpoint_dir} is intact (config.train.on_nonfinite'
          f'={self._policy!r}).')
    logging.warning('non-finite loss or gradients at %s: update skipped', where)

  def _describe(self, batch: dict[str, np.ndarray]) -> str:
    slices_by_file = {}
    for row, key in enumerate(batch['key']):
      record = self._source.record(int(key))
      bad = [k for k in TRAIN_KEYS if not np.isfinite(batch[k][row]).all()]
      slices_by_file.setdefault(f'{record.subject}/{record.volume}', []).append(
          f'{record.index}' + (f' (non-finite {"/".join(bad)})' if bad else ''))
    return '; '.join(f'{file} slice {", ".join(slices)}'
                     for file, slices in slices_by_file.items())


class _StopRequest:
  """Remembers SIGTERM/SIGINT so the loop can finish its step, save and exit cleanly."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int, check_every: int) -> bool:
    """True once this process was signalled; with several processes, on every process at the
    first step divisible by `check_every` after any was (an allgather, a blocking collective,
    paid there only: processes at one step always agree)."""
    stop = self.signal_name is not None
    if jax.process_count() > 1:
      if step % check_every:
        return False
      from jax.experimental import multihost_utils
      stop = bool(multihost_utils.process_allgather(np.array(stop)).any())
    return stop

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Profile:
  """A `jax.profiler` trace of the steps `steps` = (first, last) (empty: none) in
  WORKDIR/profile, which TensorBoard's profile plugin opens. (The profiler writes local
  files: a workdir in a bucket gets the trace uploaded once it is complete.)"""

  def __init__(self, steps: tuple[int, ...], workdir: StoragePath):
    self._steps, self._tracing = tuple(steps), False
    self._directory = workdir / PROFILE_DIR
    self._folder = StagedFolder(self._directory) if self._steps else None

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(str(self._folder.local))
      self._tracing = True

  def after(self, step: int, state: Any) -> None:
    if self._tracing and step == self._steps[1]:
      jax.block_until_ready(state)  # the trace holds the traced steps' device work
      self.close()

  def close(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
      logging.info('profile of steps %d-%d written to %s', *self._steps, self._directory)
    if self._folder is not None:
      self._folder.close()
      self._folder = None


def _check_writable(workdir: StoragePath) -> None:
  """Fails before any compute if checkpoints cannot be written in `workdir` (a folder, or a
  bucket URL: no such bucket, no credentials, unreachable). A local workdir is probed in its
  nearest existing folder: its own folders are made once written to, so a run refused later
  leaves none, and processes sharing it never remove a folder another is probing."""
  folder = workdir / TRAIN_CHECKPOINT_DIR
  if not is_url(workdir):  # a bucket has no folders (and s3fs would create a missing bucket)
    while not os.path.lexists(folder):
      folder = folder.parent
  probe = folder / f'.write-check-{os.getpid()}'
  try:
    probe.write_bytes(b'')
    probe.unlink()
  except Exception as e:  # OSError, or what the store's client raises for it
    reason = getattr(e, 'strerror', None) or describe_error(e)
    raise ConfigError(f'--workdir {workdir}: cannot write checkpoints there ({reason})') from e


def _save_config(config: ml_collections.ConfigDict, workdir: StoragePath, start_step: int
                 ) -> None:
  """config.json at the first start; a resume with other settings adds config.step_N.json."""
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + '\n'
  path = workdir / 'config.json'
  if path.exists() and path.read_text() != text:
    path = workdir / f'config.step_{start_step}.json'
  if not path.exists():
    write_atomically(path, lambda tmp: tmp.write_text(text))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from `workdir` if it holds a checkpoint), evaluates every
  `config.eval.every` steps and at the end; returns the last evaluation's metrics. `workdir`
  may be a bucket URL (gs://, s3://)."""
  workdir = as_path(workdir)
  mesh = make_mesh(config)
  check_config(config, mesh)
  _check_writable(workdir)
  is_chief = jax.process_index() == 0
  model = build_model(config)
  train_source = pipeline.make_source(config, 'train')
  train_loader = pipeline.make_loader(config, 'train',
                                      config.train.batch_size // jax.process_count(),
                                      source=train_source)
  checkpoints = TrainCheckpoints(workdir / TRAIN_CHECKPOINT_DIR, config.train.keep_checkpoints,
                                 BEST_METRIC)
  train_batches = iter(train_loader)
  start_step = checkpoints.latest_step()
  if start_step is None:
    state = create_train_state(config, model, mesh)
  else:
    state = abstract_train_state(config, model, mesh)
    checkpoints.check_compatible(start_step, state)
    state, train_batches = checkpoints.restore(start_step, state, train_batches)
    logging.info('resumed from %s at step %d', checkpoints.directory, start_step)
  start_step = start_step or 0
  if is_chief:
    _save_config(config, workdir, start_step)
  evaluator = evaluate.SplitEvaluator(config, mesh, model.apply,
                                      max_batches=config.eval.max_batches)

  batch_sharding = mesh_lib.rows(mesh)
  step_fn = jit_train_step(config, mesh, state)

  writer = MetricWriter(workdir, enabled=is_chief)
  progress = ProgressBar(config.train.num_steps, start_step, enabled=None if is_chief else False,
                         images_per_step=config.train.batch_size)
  stop = _StopRequest()
  guard = _NonFiniteGuard(config.train.on_nonfinite, config.train.max_consecutive_skips,
                          train_source, checkpoints.directory)
  profile = _Profile(config.train.profile_steps, workdir)
  eval_metrics, last_loss, compiled, throughput = {}, None, None, None
  try:
    for step in range(start_step + 1, config.train.num_steps + 1):
      profile.before(step)
      started = time.perf_counter()
      local = next(train_batches)
      batch = mesh_lib.global_batch({k: local[k] for k in TRAIN_KEYS}, batch_sharding)
      input_seconds = time.perf_counter() - started
      if compiled is None:  # compiled ahead of the first call, for its FLOP count
        compiled = step_fn.lower(state, batch).compile()
        flops = compiled_flops(compiled, loop_trips=config.train.grad_accum_steps)
        throughput = Throughput(config.train.batch_size, flops,
                                peak_flops(mesh.devices.flat[0], config.train.peak_tflops))
      throughput.took_input(input_seconds)
      state, step_metrics = compiled(state, batch)
      throughput.stepped()
      guard.watch(step, step_metrics.pop('finite'), local)
      last_step = step == config.train.num_steps
      stopping = stop.requested(step, config.train.signal_check_every)
      evaluating = step % config.eval.every == 0 or last_step
      save = step % config.train.checkpoint_every == 0 or evaluating or stopping
      logging_step = step % config.train.log_every == 0 or save
      if logging_step:
        guard.flush()
        scalars = {f'train_{k}': float(v) for k, v in jax.device_get(step_metrics).items()}
        last_loss = scalars['train_loss']
        speed = {f'speed_{k}': v for k, v in throughput.rates().items()}
        writer.write(step, {**scalars, **speed})
        logging.info('step %d: %s', step, ', '.join(  # the losses first, then the speed
            f'{k} {v:.5g}' for k, v in [*sorted(scalars.items()), *sorted(speed.items())]))
      progress.update(step, last_loss)
      step_eval = None
      if evaluating:
        eval_params = state.ema_params if config.train.ema_decay else state.params
        eval_metrics = step_eval = evaluator(eval_params)
        writer.write(step, eval_metrics)
        logging.info('step %d: %s', step,
                     ', '.join(f'{k} {v:.5g}' for k, v in sorted(eval_metrics.items())))
      if save:
        checkpoints.save(step, state, train_batches, metrics=step_eval)
      profile.after(step, state)
      if logging_step:
        throughput.restart()  # the next rates are of training alone
      if stopping:
        logging.warning('%s received: saved step %d to %s; exiting', stop.signal_name, step,
                        checkpoints.directory)
        break
  finally:
    profile.close()
    stop.restore()
    progress.close()
    checkpoints.close()
    writer.close()
  return eval_metrics
