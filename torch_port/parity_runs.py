"""The training runs of `fsmnet-parity train`: one (framework, seed) per process, from the
same initial weights, on the same batches of this project's grain pipeline.

Frameworks:
  jax            the train step fsmnet-train runs (`fsmnet_jax.train.jit_train_step`)
  torch          the reference's training loop (`torch_port.train.ReferenceTrainer`)
  torch-ulp      the reference from initial weights one ulp larger,
  torch-1thread  and on one CPU thread: the reference's own rounding noise, against which
                 the jax-vs-torch divergence is judged

A run records every step's loss and learning rate, evaluations on the test split (every
`config.eval.every` steps and at the end; the reference's convention, on the EMA weights when
`config.train.ema_decay`) and its parameters at `snapshot_steps`. Its folder holds
  run.json       {"framework", "seed", "dtype", "losses", "learning_rates", "evals", ...}
  snapshots.npz  {"step_N": all parameters at step N, flattened in Flax tree order}
and is written whole at the end or not at all.
"""

import copy
import json
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import torch

from fsmnet_jax import evaluate, mesh as mesh_lib, train
from fsmnet_jax.data import pipeline
from fsmnet_jax.files import write_atomically
from fsmnet_jax.model import FSMNet, build_model
from torch_port.convert import torch_to_flax
from torch_port.evaluate import reference_scores
from torch_port.model import TorchFSMNet
from torch_port.train import ReferenceTrainer

FRAMEWORKS = ('jax', 'torch', 'torch-ulp', 'torch-1thread')
REFERENCE = 'torch'
REFERENCE_NOISE = ('torch-ulp', 'torch-1thread')
RUN_FILE = 'run.json'
SNAPSHOTS_FILE = 'snapshots.npz'


def run_name(framework: str, seed: int) -> str:
  """The folder of a run in OUT/runs."""
  return f'{framework}-seed{seed}'


# The paper's Table 2, row by row: each row adds one part to the one before.
TABLE2_ROWS = {
    'mdunet': 'multi-modal U-Net, concat fusion (MDUNet)',
    'fsfe': '+ FSFE (frequency and spatial branches)',
    'cms': '+ CMS-fusion',
    'fsmnet': '+ FS-fusion (FSMNet)',
}


def table2_config(config: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  """`config` changed to the network of Table 2's `row`. MDUNet gets half of FSMNet's
  `num_features` as its first width, as in the reference (32 against 64)."""
  config = copy.deepcopy(config)
  if row == 'mdunet':
    config.model_name = 'mdunet'
    config.model.num_features = max(1, config.model.num_features // 2)
    return config
  config.model_name = 'fsmnet'
  config.model.update(use_frequency_branch=True, use_cms_fusion=row in ('cms', 'fsmnet'),
                      use_fs_fusion=row == 'fsmnet')
  return config


def run_config(config: ml_collections.ConfigDict, seed: int, float64: bool
               ) -> ml_collections.ConfigDict:
  """`config` for the runs of `seed`: it seeds the batches' order and masks, and float64
  computes everything in float64."""
  config = copy.deepcopy(config)
  config.seed = seed
  if float64:
    config.train.compute_dtype = 'float64'
  return config


def initial_state_dict(config: ml_collections.ConfigDict, seed: int) -> dict[str, torch.Tensor]:
  """The reference's initialisation of `config.model`, drawn from torch's RNG at `seed`."""
  torch.manual_seed(seed)
  return TorchFSMNet(**config.model).state_dict()


def snapshot_steps(steps: int) -> list[int]:
  """1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100, ... up to `steps`, and `steps`: rounding noise
  grows exponentially, so divergence is sampled on a log scale."""
  marks, scale = [], 1
  while scale <= steps:
    marks += [m * scale for m in (1, 2, 3, 5, 7)]
    scale *= 10
  return sorted({m for m in marks if m <= steps} | {steps})


def eval_steps(config: ml_collections.ConfigDict, steps: int) -> list[int]:
  """Every `config.eval.every` steps, and the last."""
  return sorted(set(range(config.eval.every, steps + 1, config.eval.every)) | {steps})


def flatten(params: Any) -> np.ndarray:
  """A Flax parameter tree as one vector, leaves in tree order (the same for both frameworks:
  torch's parameters are compared after `torch_to_flax`)."""
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)])


class _JaxRun:
  """fsmnet_jax's training state and step, from the given Flax parameters (None: drawn from
  `config.seed`, as fsmnet-train draws them)."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any | None):
    self.config = config
    mesh = train.make_mesh(config)
    train.check_config(config, mesh)
    model = build_model(config)
    self.state = train.create_train_state(config, model, mesh, params)
    self._step = train.jit_train_step(config, mesh, self.state)
    self._rows = mesh_lib.rows(mesh)
    self._evaluator = evaluate.SplitEvaluator(config, mesh, model.apply,
                                              max_batches=config.eval.max_batches)

  def step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    self.state, metrics = self._step(self.state, mesh_lib.global_batch(batch, self._rows))
    metrics = jax.device_get(metrics)  # one wait for the step, not one per value
    if not metrics['finite']:
      raise FloatingPointError('the loss or its gradient is not finite')
    return float(metrics['loss']), float(metrics['learning_rate'])

  def params(self) -> Any:
    return jax.device_get(self.state.params)

  def evaluate(self) -> dict[str, float]:
    ema = self.config.train.ema_decay
    metrics = self._evaluator(self.state.ema_params if ema else self.state.params)
    return {k: v for k, v in metrics.items() if not k.startswith('eval_zero_filled')}


class _TorchRun:
  """The reference's training loop (the twin), from the given state_dict."""

  def __init__(self, config: ml_collections.ConfigDict, state_dict: dict[str, torch.Tensor],
               dtype: torch.dtype, one_ulp_up: bool = False):
    self.config, self.dtype = config, dtype
    self._flax_model = FSMNet(**config.model)  # for the conversion of snapshots
    model = TorchFSMNet(**config.model)
    model.load_state_dict(state_dict, strict=True)
    model.to(dtype)
    if one_ulp_up:  # in the training dtype: a float32 nudge would vanish in float64 and back
      with torch.no_grad():
        for p in model.parameters():
          p.copy_(torch.nextafter(p, torch.full_like(p, np.inf)))
    self.trainer = ReferenceTrainer(model, config.train, dtype)

  def step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    learning_rate = self.trainer.learning_rate()
    loss = self.trainer.step(batch)
    if not np.isfinite(loss):
      raise FloatingPointError('the loss is not finite')
    return loss, learning_rate

  def params(self) -> Any:
    return torch_to_flax(self.trainer.state_dicts()['params'], self._flax_model)['params']

  def evaluate(self) -> dict[str, float]:
    model = self.trainer.model
    if self.config.train.ema_decay:
      model = copy.deepcopy(model)
      model.load_state_dict(self.trainer.state_dicts()['ema_params'])
    return reference_scores(model, self.config, dtype=self.dtype)


def _start(framework: str, config: ml_collections.ConfigDict,
           initial: dict[str, torch.Tensor] | None) -> _JaxRun | _TorchRun:
  float64 = config.train.compute_dtype == 'float64'
  if framework == 'jax':
    if initial is None:
      return _JaxRun(config, None)
    return _JaxRun(config, torch_to_flax(initial, FSMNet(**config.model))['params'])
  if framework == 'torch-1thread':
    torch.set_num_threads(1)
  return _TorchRun(config, initial, torch.float64 if float64 else torch.float32,
                   one_ulp_up=framework == 'torch-ulp')


def _batches(config: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
  loader = pipeline.make_loader(config, 'train', config.train.batch_size)
  for batch in loader:
    yield {k: batch[k] for k in train.TRAIN_KEYS}


def train_run(framework: str, config: ml_collections.ConfigDict, steps: int,
              initial: dict[str, torch.Tensor] | None, run_dir: Path) -> dict[str, Any]:
  """Trains `framework` for `steps` from the `initial` state_dict (None: a JAX run of a
  network the twin lacks, initialised by fsmnet_jax) on `config`'s batches and writes
  `run_dir` (see the module docstring); returns its run.json contents."""
  started = time.perf_counter()
  run = _start(framework, config, initial)
  snapshots = {'step_0': flatten(run.params())}
  losses, learning_rates, evals = [], [], {}
  snapshot_at, eval_at = set(snapshot_steps(steps)), set(eval_steps(config, steps))
  for step, batch in zip(range(1, steps + 1), _batches(config)):
    loss, learning_rate = run.step(batch)
    losses.append(loss)
    learning_rates.append(learning_rate)
    if step in snapshot_at:
      snapshots[f'step_{step}'] = flatten(run.params())
    if step in eval_at:
      evals[str(step)] = run.evaluate()
  result = {'framework': framework, 'seed': config.seed, 'dtype': config.train.compute_dtype,
            'steps': steps, 'losses': losses, 'learning_rates': learning_rates,
            'evals': evals, 'eval': evals[str(steps)],
            'seconds': round(time.perf_counter() - started, 1)}

  def write(folder: Path) -> None:
    folder.mkdir()
    np.savez(folder / SNAPSHOTS_FILE, **snapshots)
    (folder / RUN_FILE).write_text(json.dumps(result, indent=1))

  # The launcher starts a run only where run.json is missing: what is there is unfinished.
  write_atomically(run_dir, write, overwrite=True)
  return result
