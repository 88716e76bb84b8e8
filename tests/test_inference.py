"""Inference: loading every checkpoint kind, the sharded Reconstructor, data consistency."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax import inference
from fsmnet_jax.checkpoint import CheckpointError, save_variables
from fsmnet_jax.data import kspace, transforms
from fsmnet_jax.model import FSMNet

REPO = Path(__file__).resolve().parents[1]


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_load_params_from_a_variables_folder(tmp_path, tiny_model_and_params):
  model, params = tiny_model_and_params
  save_variables({'params': params}, tmp_path / 'variables')
  loaded, inferred = inference.load_params(tmp_path / 'variables')
  assert inferred == model
  _assert_trees_equal(loaded, params)
  with pytest.raises(CheckpointError, match='variables: its parameters do not fit') as error:
    inference.load_params(tmp_path / 'variables', FSMNet(num_features=12, num_res_blocks=1,
                                                         num_heads=2))
  assert 'other shape' in str(error.value)
  with pytest.raises(CheckpointError, match='missing: no such checkpoint'):
    inference.load_params(tmp_path / 'missing')


def test_load_params_from_a_training_workdir_prefers_the_ema(tmp_path, tiny_model_and_params):
  model, params = tiny_model_and_params
  config = tiny.get_config()
  # The fields of train.TrainState that matter here, as orbax saves them.
  state = {'step': 7, 'params': params, 'opt_state': {}, 'rng': np.zeros(2, np.uint32),
           'ema_params': jax.tree_util.tree_map(lambda x: 2 * x, params)}
  workdir = tmp_path / 'run'
  for step in (3, 12):  # the latest complete step wins, not the first listed
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save((workdir / 'checkpoints' / str(step) / 'state').absolute(), state)
  (workdir / 'checkpoints' / '15.orbax-checkpoint-tmp-1').mkdir()  # an unfinished save
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  for checkpoint in (workdir, workdir / 'checkpoints' / '12'):
    loaded, _ = inference.load_params(checkpoint, model)
    _assert_trees_equal(loaded, state['ema_params'])
    assert inference.run_config_file(checkpoint) == (workdir / 'config.json').absolute()
  with pytest.raises(CheckpointError, match='no complete checkpoint'):
    (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True)
    inference.load_params(tmp_path / 'empty')


def test_load_params_from_a_pytorch_file(tmp_path, tiny_model_and_params):
  torch = pytest.importorskip('torch')
  # pylint: disable-next=import-outside-toplevel
  from torch_port import checkpoint as torch_checkpoint, convert
  model, params = tiny_model_and_params
  torch.save(convert.flax_to_torch({'params': params}), tmp_path / 'model.pth')
  loaded, inferred = torch_checkpoint.load_params(tmp_path / 'model.pth')
  assert inferred == model
  _assert_trees_equal(loaded, params)
  with pytest.raises(CheckpointError, match='model.pth: a PyTorch checkpoint; read it with '
                                            'torch_port.checkpoint.load_params'):
    inference.load_params(tmp_path / 'model.pth')
  (tmp_path / 'broken.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(CheckpointError, match='broken.pth: '):
    torch_checkpoint.load_params(tmp_path / 'broken.pth')


def test_reconstruct_slices_normalises_as_the_pipeline(tiny_model_and_params):
  model, params = tiny_model_and_params
  rng = np.random.default_rng(0)
  under, aux = rng.random((2, 3, 32, 32), np.float32)
  examples = [transforms.normalize_example(u, u, a) for u, a in zip(under, aux)]
  stack = lambda key: np.stack([e[key] for e in examples])
  channel = lambda key: stack(key)[..., None]
  expected = transforms.denormalize_images(
      model.apply({'params': params}, channel('target_under'), channel('aux'))['img_out'],
      stack('mean'), stack('std'))
  actual = inference.reconstruct_slices(params, under, aux, apply_fn=model.apply)
  # Per-slice statistics in jnp vs numpy differ in float32 rounding only (measured max
  # difference 1.2e-7 on outputs of magnitude ~1; 2.4e-7 with other weights).
  np.testing.assert_allclose(actual, expected, atol=2e-6)


def test_reconstructor_pads_batches_and_compiles_once(tiny_model_and_params):
  model, params = tiny_model_and_params
  reconstructor = inference.Reconstructor(model, params, batch_size=2)
  rng = np.random.default_rng(1)
  under, aux = rng.random((2, 5, 32, 32), np.float32)
  done = []
  result = reconstructor(under, aux, on_batch=done.append)
  assert result.shape == (5, 32, 32) and done == [2, 4, 5]
  reconstruct = jax.jit(functools.partial(inference.reconstruct_slices, params,
                                          apply_fn=model.apply))
  expected = np.asarray(reconstruct(under, aux))
  # Batches of 2 (one padded) vs one batch of 5 differ by float32 rounding, which this network
  # amplifies ~1e4x on some inputs (upstream-notes "Numerics"): measured <= 2.1e-7 here, and
  # with other weights 1.2e-7 on four slices but 2.1e-3 on one, whose output moved as much under
  # a 1e-7 relative input change. So each slice is held to its own measured sensitivity to such
  # a change (floor 1e-6).
  nudged = np.asarray(reconstruct(under * np.float32(1 + 1e-7), aux))
  sensitivity = np.abs(nudged - expected).max(axis=(1, 2))
  difference = np.abs(result - expected).max(axis=(1, 2))
  assert np.all(difference <= np.maximum(2 * sensitivity, 1e-6)), (difference, sensitivity)
  reconstructor(under[:3], aux[:3])
  assert reconstructor.compiled_shapes() == 1
  with pytest.raises(ValueError, match='same shape|one shape'):
    reconstructor(under, aux[:, :16])


def _phantom(size: int = 32) -> np.ndarray:
  rows, cols = np.mgrid[:size, :size] / size - 0.5
  return ((rows**2 + cols**2 < 0.16) * (1 + rows)).astype(np.float32)


def test_data_consistency_restores_measured_lines():
  truth = _phantom()
  full = kspace.fft2c(truth)
  mask = np.zeros((32, 32), np.float32)
  mask[:, ::3] = 1
  # The truth is a fixed point; a full mask gives the truth back whatever the estimate.
  np.testing.assert_allclose(inference.data_consistency(truth, full * mask, mask), truth,
                             atol=1e-5)
  blurred = np.roll(truth, 2, axis=0) * 0.8
  np.testing.assert_allclose(inference.data_consistency(blurred, full, np.ones_like(mask)),
                             truth, atol=1e-5)
  # Measured lines pull a wrong estimate toward the truth.
  corrected = inference.data_consistency(blurred, full * mask, mask)
  assert np.linalg.norm(corrected - truth) < 0.8 * np.linalg.norm(blurred - truth)
  # A complex object: magnitude out, measured lines of its k-space exact.
  phase = np.linspace(-1, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
  complex_full = kspace.fft2c(truth * np.exp(1j * phase))
  result = inference.data_consistency(truth, complex_full * mask, mask, phase)
  np.testing.assert_allclose(result, truth, atol=1e-5)


SHARDED_RUN = '''
import functools, sys
import jax, numpy as np
from fsmnet_jax.configs import tiny
from fsmnet_jax import inference
from fsmnet_jax.model import FSMNet, init_variables
model = FSMNet(**tiny.get_config().model)
params = init_variables(model, jax.random.key(0))['params']
under, aux = np.random.default_rng(1).random((2, 6, 32, 32), np.float32)
reconstructor = inference.Reconstructor(model, params, batch_size=3)
result = reconstructor(under, aux)
on_one_device = jax.jit(functools.partial(inference.reconstruct_slices, params,
                                          apply_fn=model.apply))
expected = np.asarray(on_one_device(under, aux))
nudged = np.asarray(on_one_device(under * np.float32(1 + 1e-7), aux))
np.savez(sys.argv[1], result=result, expected=expected, nudged=nudged,
         batch_size=reconstructor.batch_size, devices=jax.device_count())
'''


def test_reconstructor_shards_slices_over_devices(tmp_path):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  subprocess.run([sys.executable, '-c', SHARDED_RUN, str(tmp_path / 'out.npz')], check=True,
                 env=env, cwd=REPO)
  out = np.load(tmp_path / 'out.npz')
  assert out['devices'] == 4 and out['batch_size'] == 4  # 3 rounded up to the device count
  # As in the single-device test: each slice within its own float32 sensitivity.
  sensitivity = np.abs(out['nudged'] - out['expected']).max(axis=(1, 2))
  difference = np.abs(out['result'] - out['expected']).max(axis=(1, 2))
  assert np.all(difference <= np.maximum(2 * sensitivity, 1e-6)), (difference, sensitivity)
