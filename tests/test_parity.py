"""Numerical parity of Flax FSMNet with TorchFSMNet (the reference's twin), proven in layers.

Float32 end-to-end outputs cannot agree tighter than the reference agrees with itself (see
docs/parity.md), so: block by block in float32 on the real inputs each block
sees; end to end in float64 at power-of-two sizes; end to end in float32 relative to the
reference's own float32 noise; gradients and one optimiser step in float64.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from float32_bounds import HAS_AVX512, UNCALIBRATED
from fsmnet_jax import blocks
from fsmnet_jax.conv import specialized_for
from fsmnet_jax.losses import reference_loss
from fsmnet_jax.model import FSMNet
from fsmnet_jax.optim import parameter_labels, reference_optimizer
from torch_port import model as torch_blocks
from torch_port.model import from_nhwc, to_nhwc
from torch_port.convert import torch_to_flax
from torch_port.losses import reference_loss as torch_reference_loss
from torch_port.parity import check_parity, flax_outputs, random_inputs, torch_outputs
from training_runs import UNOPTIMIZED_CODE

BLOCK_TOLERANCE = 1e-5  # float32, max |a - b| / max |b|, per block call
FLOAT64_TOLERANCE = 1e-9
GRADIENT_TOLERANCE = 1e-8
STEP_TOLERANCE = 1e-9


def _relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _flax_block_path(torch_name: str) -> tuple[str, ...]:
  """Flax module path of the torch block at `torch_name` (e.g. 'down1_fre.1' -> block)."""
  fusion = re.fullmatch(r'(conv_fuse(?:_fre|_spa)?)\.(\d+)(?:\.(\w+))?', torch_name)
  if fusion:
    return (f'{fusion.group(1)}_{fusion.group(2)}',) + ((fusion.group(3),) if fusion.group(3) else ())
  stage, index = torch_name.split('.')
  resampling = re.fullmatch(r'(down|up)\d(_fre)?(_T1)?', stage) is not None
  return (stage, 'resample' if resampling and index == '0' else 'block')


def _flax_block(module: 'torch.nn.Module', heads: int, res_blocks: int):
  if isinstance(module, torch_blocks.FreBlock):
    return blocks.FreBlock()
  if isinstance(module, torch_blocks.ResidualGroup):
    return blocks.ResidualGroup(res_blocks)
  if isinstance(module, torch_blocks.DownSample):
    return blocks.DownSample()
  if isinstance(module, torch_blocks.Attention):
    return blocks.ChannelCrossAttention(heads)
  if isinstance(module, torch_blocks.FSFusion):
    return blocks.FSFusion(heads)
  if isinstance(module, torch_blocks.CMSFusion):
    return blocks.CMSFusion()
  if isinstance(module, torch.nn.Sequential) and any(isinstance(m, torch.nn.PixelShuffle)
                                                     for m in module.children()):
    return blocks.UpSample()
  return None


def test_every_block_matches_in_float32(reference_weights):
  torch_model, state_dict = reference_weights
  params = torch_to_flax(state_dict)['params']
  calls = []
  handles = []
  for name, module in torch_model.named_modules():
    block = _flax_block(module, heads=8, res_blocks=2)
    if block is not None:
      hook = lambda m, inputs, output, name=name, block=block: calls.append(
          (name, block, inputs, output))
      handles.append(module.register_forward_hook(hook))
  main, aux = (from_nhwc(x, torch.float32) for x in random_inputs(1, 64, 0))
  with torch.no_grad():
    torch_model(main, aux)
  for handle in handles:
    handle.remove()

  kinds = {type(block).__name__ for _, block, _, _ in calls}
  assert kinds == {'FreBlock', 'ResidualGroup', 'DownSample', 'UpSample', 'ChannelCrossAttention',
                   'FSFusion', 'CMSFusion'}
  assert len(calls) == 22 + 22 + 12 + 6 + 28 + 14 + 10
  worst = {}
  for name, block, inputs, output in calls:
    subtree = params
    for key in _flax_block_path(name):
      subtree = subtree[key]
    ours = block.apply({'params': subtree}, *(jnp.asarray(to_nhwc(x)) for x in inputs))
    error = _relative(ours, to_nhwc(output))
    worst[type(block).__name__] = max(error, worst.get(type(block).__name__, 0))
    assert error < BLOCK_TOLERANCE, f'{name} ({type(block).__name__}): relative error {error:.2e}'
  print('worst float32 relative error per block:', {k: f'{v:.1e}' for k, v in worst.items()})


@pytest.mark.parametrize('size', [32, 128])  # 64 px: check_parity's float64 part, below
def test_whole_model_float64(reference_weights, size):
  torch_model, state_dict = reference_weights
  variables = torch_to_flax(state_dict)
  inputs = random_inputs(2, size, seed=size)
  expected = torch_outputs(torch_model, *inputs, torch.float64)
  ours = flax_outputs(FSMNet(), variables, *inputs, 'float64')
  torch_model.float()
  errors = {name: _relative(ours[name], expected[name]) for name in ('img_out', 'img_fre')}
  print(f'float64 max relative error at {size} px:', {k: f'{v:.1e}' for k, v in errors.items()})
  assert all(error < FLOAT64_TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize('size', [64, 240])
def test_whole_model_float32_within_reference_noise(reference_weights, size):
  torch_model, state_dict = reference_weights
  report = check_parity(torch_model, torch_to_flax(state_dict), FSMNet(), size=size, seed=size)
  print('\n'.join(report.lines()))
  if report.float64_judged:  # power-of-two sizes
    assert all(e.max_rel < FLOAT64_TOLERANCE for e in report.float64.values()), report.float64
  if size == 64 and not HAS_AVX512 and not report.passed:  # after the float64 check
    pytest.xfail(UNCALIBRATED)
  assert report.passed, '\n'.join(report.lines())


def _float64(tree):
  return jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), tree)


def test_gradients_and_one_optimizer_step_float64(reference_weights):
  torch_model, state_dict = reference_weights
  model = FSMNet()
  target_under, aux = random_inputs(2, 32, seed=7)
  target = np.clip(target_under + 0.05 * np.random.default_rng(8).normal(size=target_under.shape),
                   0, 1)

  torch_model = torch_model.double()
  optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, betas=(0.9, 0.999),
                                weight_decay=1e-4)
  optimizer.zero_grad()
  loss = torch_reference_loss(torch_model(from_nhwc(target_under), from_nhwc(aux)),
                              from_nhwc(target))
  loss.backward()
  torch_grads = {k: None if p.grad is None else p.grad.detach().clone()
                 for k, p in torch_model.named_parameters()}
  torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.01)
  optimizer.step()
  stepped = torch_to_flax({k: v.detach() for k, v in torch_model.state_dict().items()})['params']
  expected_grads = torch_to_flax({k: torch.zeros_like(v) if torch_grads[k] is None else torch_grads[k]
                                  for k, v in state_dict.items()})['params']
  torch_model.load_state_dict(state_dict)
  torch_model.float()

  with jax.enable_x64(True):
    params = _float64(torch_to_flax(state_dict)['params'])

    def loss_fn(params):
      outputs = model.apply({'params': params}, *(jnp.asarray(x) for x in (target_under, aux)))
      return reference_loss(outputs, jnp.asarray(target))[0]

    # LLVM's optimisations off (UNOPTIMIZED_CODE): the same float64 arithmetic, compiled in
    # less time.
    value, grads = jax.jit(specialized_for(jax.default_backend(), jax.value_and_grad(loss_fn)),
                           compiler_options=UNOPTIMIZED_CODE)(params)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-12)
    flat_grads = jax.tree_util.tree_leaves_with_path(grads)
    expected_flat = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
    for path, grad in flat_grads:
      expected = expected_flat[path]
      if 'spa_att' in jax.tree_util.keystr(path):
        assert not np.any(np.asarray(grad)) and not np.any(expected)
      else:
        assert _relative(grad, expected) < GRADIENT_TOLERANCE, jax.tree_util.keystr(path)

    optimizer_jax = reference_optimizer(1e-4, parameter_labels(params, model))
    # Jitted: one program, not one dispatch per operation on each of the 832 arrays.
    updates, _ = jax.jit(optimizer_jax.update, compiler_options=UNOPTIMIZED_CODE)(
        grads, optimizer_jax.init(params), params)
    new_params = optax.apply_updates(params, updates)
    expected_flat = dict(jax.tree_util.tree_leaves_with_path(stepped))
    old_flat = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, value in jax.tree_util.tree_leaves_with_path(new_params):
      expected, old = np.asarray(expected_flat[path], np.float64), np.asarray(old_flat[path])
      assert _relative(value, expected) < STEP_TOLERANCE, jax.tree_util.keystr(path)
      if 'spa_att' in jax.tree_util.keystr(path):  # no gradient in torch: not even decayed
        np.testing.assert_array_equal(value, old)
        np.testing.assert_array_equal(expected, old)
