"""Training parity, level 1 (same algorithm): in float64, from the same weights on the same
batches, the train step fsmnet-train runs and the reference's training step (torch_port.train)
give the same losses, learning rates and parameters over steps that include a decay; with
fsmnet_jax's gradient accumulation and EMA as well (the twin does them the same way).

Only the first steps can be compared this tightly: the reference is chaotic even in float64
(weights x (1 + 1e-15) move its loss by 2.5e-16, 6.7e-15, 2.2e-12, 1.6e-10, 3.5e-7, 8.7e-4 over
six steps at lr 2e-3, measured on the reference code), so three steps at lr 2e-3 are where a
1e-9 bound on the loss means the same computation, not luck.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from conftest import randomize_scalars
from fsmnet_jax import mesh as mesh_lib, train
from fsmnet_jax.configs import tiny
from fsmnet_jax.model import FSMNet
from torch_port import TorchFSMNet
from torch_port.convert import torch_to_flax
from torch_port.parity import random_inputs
from torch_port.train import ReferenceTrainer
from training_runs import SPATIAL_BRANCH, UNOPTIMIZED_CODE, relative_l2

STEPS = 3
LOSS_TOLERANCE = 1e-9  # relative, per step
PARAMS_TOLERANCE = 1e-6  # |JAX - torch| / |change| after STEPS steps (params, EMA)


def _batches(batch_size: int, size: int) -> list[dict[str, np.ndarray]]:
  """Random batches in float32, as the input pipeline yields them."""
  batches = []
  for step in range(STEPS):
    target_under, aux = random_inputs(batch_size, size, seed=10 + step)
    noise = np.random.default_rng(20 + step).normal(scale=0.05, size=target_under.shape)
    batch = {'target_under': target_under, 'aux': aux,
             'target': np.clip(target_under + noise, 0, 1)}
    batches.append({k: v.astype(np.float32) for k, v in batch.items()})
  return batches


def _config(**train_overrides):
  config = tiny.get_config()
  # The decay after step 2 puts a learning-rate change among the compared steps.
  config.train.update(learning_rate=2e-3, decay_every=2, compute_dtype='float64',
                      **train_overrides)
  return config


@pytest.mark.parametrize('model_overrides, train_overrides', [
    ({}, {}),  # the reference's recipe
    # fsmnet_jax's additions, on the spatial branch alone (Table 2's ablation): how the step
    # accumulates and averages does not depend on the network, and its float64 step compiles
    # in a fraction of the whole model's (~130 s with the accumulation loop, 2-core Zen 3).
    (SPATIAL_BRANCH, {'batch_size': 4, 'grad_accum_steps': 2, 'ema_decay': 0.9}),
], ids=['reference', 'spatial_branch_accumulation_and_ema'])
def test_the_float64_train_step_follows_the_reference_step_by_step(model_overrides,
                                                                   train_overrides):
  config = _config(**train_overrides)
  config.model.update(model_overrides)
  torch.manual_seed(0)
  torch_model = randomize_scalars(TorchFSMNet(**config.model), seed=1)
  initial = torch_to_flax(torch_model.state_dict())['params']
  trainer = ReferenceTrainer(torch_model, config.train, torch.float64)
  batches = _batches(config.train.batch_size, config.data.image_size)

  with jax.enable_x64(True):
    mesh = train.make_mesh(config)
    train.check_config(config, mesh)
    state = train.create_train_state(config, FSMNet(**config.model), mesh, initial)
    # LLVM's optimisations off: the same float64 arithmetic, compiled in less time.
    step = jax.jit(train.make_train_step(config, mesh_lib.platform(mesh)),
                   compiler_options=UNOPTIMIZED_CODE)
    differences = []
    for index, batch in enumerate(batches):
      learning_rate = trainer.learning_rate()
      torch_loss = trainer.step(batch)
      state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
      assert metrics['loss'].dtype == jnp.float64 and bool(metrics['finite'])
      assert float(metrics['learning_rate']) == learning_rate == 2e-3 * 0.5 ** (index // 2)
      differences.append(abs(float(metrics['loss']) - torch_loss) / torch_loss)
    trained = {'params': jax.device_get(state.params)}
    if config.train.ema_decay:
      trained['ema_params'] = jax.device_get(state.ema_params)
  print('relative loss differences per step:', ', '.join(f'{d:.1e}' for d in differences))
  assert max(differences) < LOSS_TOLERANCE, differences

  for name, expected in trainer.state_dicts().items():
    ours, expected = trained.pop(name), torch_to_flax(expected)['params']
    assert all(x.dtype == np.float64 for x in jax.tree_util.tree_leaves(ours))
    distance = relative_l2(ours, expected, initial)
    print(f'{name} after {STEPS} steps: |JAX - torch| / |change| = {distance:.1e}')
    assert distance < PARAMS_TOLERANCE, name
    # The FS-fusion weights the reference never uses: no gradient in torch, so not even
    # decayed.
    for fusion in (k for k in ours if k.startswith('conv_fuse_') and 'spa_att' in ours[k]):
      for leaf, other, start in zip(*(jax.tree_util.tree_leaves(tree[fusion]['spa_att'])
                                      for tree in (ours, expected, initial))):
        np.testing.assert_array_equal(leaf, start)
        np.testing.assert_array_equal(other, start)
  assert not trained  # every JAX tree compared

