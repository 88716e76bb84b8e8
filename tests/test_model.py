"""Tests for FSMNet: shapes, the reference's parameter tree, init, jit, gradients, ablations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float32_bounds import calibrated_on_avx512
from fsmnet_jax.model import FSMNet, FSMNetTiny, count_params, init_variables
from training_runs import UNOPTIMIZED_CODE

SIZE = 32
# The reference's state_dict at the default size: 832 tensors, 14,053,528 numbers.
REFERENCE_NUM_TENSORS = 832
REFERENCE_NUM_PARAMS = 14_053_528
# jit vs un-jitted, calibrated on 28 random inputs and initialisations (tiny model, 32 and 64 px):
# in float64 the largest relative difference seen was 1.8e-14; in float32 the difference was at
# most 5.4x the input's own float32 rounding error (float32 vs float64 output). Both bounds
# below leave a margin of 4x or more, and a real defect moves outputs by > 1e-3.
JIT_TOLERANCE_FLOAT64 = 1e-12
JIT_TOLERANCE_FLOAT32_VS_ROUNDING = 20.0


def _inputs(seed=0, batch=2, size=SIZE):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.uniform(k1, (batch, size, size, 1)), jax.random.uniform(k2, (batch, size, size, 1))


def _flat_params(variables):
  return {jax.tree_util.keystr(path, simple=True, separator='/'): value
          for path, value in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}


def _param_names(variables):
  return set(_flat_params(variables))


def _relative(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope='module')
def tiny():
  model = FSMNetTiny()
  return model, init_variables(model, jax.random.key(0))


def test_output_shapes_and_dtypes(tiny):
  model, variables = tiny
  out = jax.jit(model.apply)(variables, *_inputs())
  assert set(out) == {'img_out', 'img_fre'}
  for value in out.values():
    assert value.shape == (2, SIZE, SIZE, 1) and value.dtype == jnp.float32
    assert bool(jnp.isfinite(value).all())


def test_default_model_has_the_reference_parameter_tree():
  model = FSMNet()
  assert (model.num_features, model.num_res_blocks, model.num_heads) == (64, 2, 8)
  shapes = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
  assert count_params(shapes) == REFERENCE_NUM_PARAMS
  assert len(jax.tree_util.tree_leaves(shapes)) == REFERENCE_NUM_TENSORS
  params = shapes['params']
  assert params['head_fre']['conv']['kernel'].shape == (3, 3, 1, 64)
  assert params['down1_fre']['resample']['proj']['conv']['kernel'].shape == (1, 1, 256, 64)
  assert params['up3']['resample']['conv']['kernel'].shape == (1, 1, 64, 256)
  assert params['conv_fuse_13']['fre_att']['kv_dwconv']['kernel'].shape == (3, 3, 1, 128)
  assert params['conv_fuse_fre_4']['fuse_1']['kernel'].shape == (3, 3, 64, 128)
  assert params['tail']['conv']['kernel'].shape == (3, 3, 64, 1)
  stages = {name for name in params if not name.startswith('conv_fuse')}
  assert len(stages) == 2 * 9 + 2 * 16  # per branch, T1: head + 8 encoder stages; T2: + 6 + tail


def test_initial_values_follow_pytorch_defaults(tiny):
  _, variables = tiny
  flat = _flat_params(variables)
  slopes = [v for k, v in flat.items() if k.endswith('negative_slope')]
  scales = [v for k, v in flat.items() if k.endswith('re_scale/scale')]
  temperatures = [v for k, v in flat.items() if k.endswith('temperature')]
  assert slopes and scales and temperatures
  np.testing.assert_array_equal(np.stack(slopes), 0.25)
  np.testing.assert_array_equal(np.stack(scales), 1.0)
  np.testing.assert_array_equal(np.concatenate(temperatures), 1.0)


@calibrated_on_avx512
def test_jit_equals_eager_float32(tiny):
  model, variables = tiny
  inputs = _inputs(seed=1)
  jitted = jax.jit(model.apply)(variables, *inputs)
  eager = model.apply(variables, *inputs)
  with jax.enable_x64(True):
    exact = model.apply(jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables),
                        *(x.astype(jnp.float64) for x in inputs))
    for name in ('img_out', 'img_fre'):
      rounding = _relative(eager[name], exact[name])
      assert 0 < rounding < 1e-3
      assert _relative(jitted[name], eager[name]) <= JIT_TOLERANCE_FLOAT32_VS_ROUNDING * rounding


def test_jit_equals_eager_float64(tiny):
  model, variables = tiny
  with jax.enable_x64(True):
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)
    inputs = [x.astype(jnp.float64) for x in _inputs(seed=2)]
    jitted = jax.jit(model.apply)(variables, *inputs)
    eager = model.apply(variables, *inputs)
    for name in ('img_out', 'img_fre'):
      assert jitted[name].dtype == jnp.float64
      assert _relative(jitted[name], eager[name]) < JIT_TOLERANCE_FLOAT64


@functools.cache
def _l1_gradients(model):
  """The jitted gradient of an L1 loss on both outputs, compiled once for all inputs."""

  def loss(params, target_under, aux, target):
    out = model.apply({'params': params}, target_under, aux)
    return jnp.mean(jnp.abs(out['img_out'] - target)) + jnp.mean(jnp.abs(out['img_fre'] - target))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=UNOPTIMIZED_CODE)


@pytest.mark.parametrize('zeros', [False, True], ids=['random', 'all_zero'])
def test_l1_gradients_are_finite(tiny, zeros):
  model, variables = tiny
  target_under, aux = _inputs(seed=3)
  target = target_under + 0.1
  if zeros:
    target_under, aux, target = (jnp.zeros_like(target_under),) * 3
  grads = _l1_gradients(model)(variables['params'], target_under, aux, target)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


ABLATIONS = {
    'no_frequency_branch': dict(use_frequency_branch=False, use_fs_fusion=False),
    'no_cms_fusion': dict(use_cms_fusion=False),
    'no_fs_fusion': dict(use_fs_fusion=False),
    'spa_att': dict(use_spa_att=True),
}


@pytest.mark.parametrize('name', list(ABLATIONS))
def test_ablation_switches_change_the_parameter_tree(tiny, name):
  _, full_variables = tiny
  model = FSMNetTiny(**ABLATIONS[name])
  variables = init_variables(model, jax.random.key(0))
  full, ablated = _param_names(full_variables), _param_names(variables)
  removed = full - ablated
  assert not ablated - full
  tops = {k.split('/')[0] for k in removed}
  if name == 'no_frequency_branch':
    assert tops == {k.split('/')[0] for k in full if '_fre' in k or k.startswith('conv_fuse_')
                    and not k.startswith('conv_fuse_spa')}
  elif name == 'no_cms_fusion':
    assert tops == {f'conv_fuse_{b}_{i}' for b in ('fre', 'spa') for i in range(5)}
  elif name == 'no_fs_fusion':
    assert tops == {f'conv_fuse_{i}' for i in range(14)}
  else:
    assert not removed  # same tree as the reference; spa_att now used (see test_blocks)

  out = jax.jit(model.apply)(variables, *_inputs())
  assert set(out) == ({'img_out'} if name == 'no_frequency_branch' else {'img_out', 'img_fre'})
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_inconsistent_switches_are_refused():
  with pytest.raises(ValueError, match='use_fs_fusion=True .* needs use_frequency_branch=True'):
    FSMNet(use_frequency_branch=False)
  with pytest.raises(ValueError, match='divisible by num_heads'):
    FSMNet(num_features=12, num_heads=8)


@pytest.mark.parametrize('target_shape,aux_shape,message', [
    ((2, 36, 32, 1), (2, 36, 32, 1), 'divisible by 8 .* got 36x32'),
    ((2, 32, 32), (2, 32, 32), r'shape \(batch, height, width, 1\).* got shape \(2, 32, 32\)'),
    ((2, 32, 32, 3), (2, 32, 32, 3), r'target_under of shape .* got shape \(2, 32, 32, 3\)'),
    ((2, 32, 32, 1), (2, 32, 32, 2), r'aux of shape .* got shape \(2, 32, 32, 2\)'),
    ((2, 32, 32, 1), (1, 32, 32, 1), r'same shape; got \(2, 32, 32, 1\) and \(1, 32, 32, 1\)'),
    ((2, 0, 32, 1), (2, 0, 32, 1), 'divisible by 8'),
])
def test_bad_shapes_raise_clear_errors(tiny, target_shape, aux_shape, message):
  model, variables = tiny
  with pytest.raises(ValueError, match=message):
    model.apply(variables, jnp.zeros(target_shape), jnp.zeros(aux_shape))
