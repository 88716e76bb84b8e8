"""Tests for FSMNet's blocks: the reference's quirks and numeric guards, block by block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.blocks import ChannelCrossAttention, FreBlock, FSFusion, ResidualGroup

FEATURES = 8


def _features(seed, size=16):
  return jax.random.normal(jax.random.key(seed), (2, size, size, FEATURES))


@pytest.mark.parametrize('use_spa_att', [False, True])
def test_fs_fusion_uses_spa_att_only_when_asked(use_spa_att):
  block = FSFusion(num_heads=2, use_spa_att=use_spa_att)
  freq, spatial = _features(0), _features(1)
  variables = block.init(jax.random.key(2), freq, spatial)
  assert set(variables['params']) == {'fre', 'spa', 'fre_att', 'spa_att', 'fuse_0', 'fuse_1'}
  moved = jax.tree_util.tree_map(lambda p: p + 0.5, variables['params']['spa_att'])
  changed = {'params': {**variables['params'], 'spa_att': moved}}
  difference = jnp.abs(block.apply(variables, freq, spatial) - block.apply(changed, freq, spatial))
  if use_spa_att:
    assert float(difference.max()) > 1e-3
  else:
    assert float(difference.max()) == 0.0


def test_fs_fusion_argument_roles():
  # The reference's conv named `fre` is applied to the spatial features: with every weight but
  # fre's zeroed, only the spatial input can reach the output.
  block = FSFusion(num_heads=2)
  freq, spatial = _features(0), _features(1)
  variables = block.init(jax.random.key(2), freq, spatial)
  params = jax.tree_util.tree_map(jnp.zeros_like, variables['params'])
  params['fre'] = variables['params']['fre']
  out = block.apply({'params': params}, freq, spatial)
  out_other_freq = block.apply({'params': params}, _features(5), spatial)
  np.testing.assert_array_equal(out, out_other_freq)
  assert float(jnp.abs(out).max()) > 0


def test_attention_heads_and_normalisation():
  heads = 2
  attention = ChannelCrossAttention(num_heads=heads)
  x, y = _features(0, size=6), _features(1, size=6)
  variables = attention.init(jax.random.key(0), x, y)
  assert variables['params']['q_dwconv']['kernel'].shape == (3, 3, 1, FEATURES)
  assert variables['params']['kv_dwconv']['kernel'].shape == (3, 3, 1, 2 * FEATURES)
  np.testing.assert_array_equal(variables['params']['temperature'], 1.0)
  # Identity projections and centre-tap depthwise kernels leave q = x and k = v = y.
  eye = np.eye(FEATURES, dtype=np.float32)[None, None]
  centre = np.zeros((3, 3, 1, 2 * FEATURES), np.float32)
  centre[1, 1] = 1
  temperature = np.array([0.5, 3.0], np.float32)
  params = {'q': {'kernel': eye}, 'q_dwconv': {'kernel': centre[..., :FEATURES]},
            'kv': {'kernel': np.concatenate([eye, eye], -1)}, 'kv_dwconv': {'kernel': centre},
            'project_out': {'kernel': eye}, 'temperature': temperature}
  out = np.asarray(attention.apply({'params': params}, x, y))

  b, h, w, c = x.shape
  per_head = c // heads
  xs, ys = np.asarray(x).reshape(b, h * w, c), np.asarray(y).reshape(b, h * w, c)
  expected = np.zeros_like(xs)
  for i in range(b):
    for head in range(heads):
      channels = slice(head * per_head, (head + 1) * per_head)
      q, k = xs[i, :, channels], ys[i, :, channels]
      q, k = q / np.linalg.norm(q, axis=0), k / np.linalg.norm(k, axis=0)
      logits = q.T @ k * temperature[head]
      weights = np.exp(logits - logits.max(1, keepdims=True))
      weights /= weights.sum(1, keepdims=True)
      expected[i, :, channels] = (weights @ ys[i, :, channels].T).T
  np.testing.assert_allclose(out, expected.reshape(b, h, w, c), rtol=1e-5, atol=1e-6)


def test_fre_block_is_finite_with_finite_gradients_on_constant_input():
  block = FreBlock()
  x = jnp.zeros((1, 16, 16, FEATURES))
  variables = block.init(jax.random.key(0), x)
  y = block.apply(variables, x)
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())
  grads = jax.grad(lambda p, x: jnp.abs(block.apply({'params': p}, x)).sum(), argnums=(0, 1))(
      variables['params'], x)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_residual_group_starts_as_scaled_identity_plus_body():
  group = ResidualGroup(num_res_blocks=2)
  x = _features(0)
  variables = group.init(jax.random.key(0), x)
  assert set(variables['params']) == {'res_block_0', 'res_block_1', 'tail', 're_scale'}
  assert float(variables['params']['re_scale']['scale']) == 1.0
  params = dict(variables['params'], tail=jax.tree_util.tree_map(jnp.zeros_like,
                                                                   variables['params']['tail']))
  np.testing.assert_allclose(group.apply({'params': params}, x), x, rtol=1e-6)
