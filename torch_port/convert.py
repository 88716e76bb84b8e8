"""Weight conversion between the reference PyTorch state_dict and Flax `FSMNet` variables.

Layouts: conv kernels OIHW (torch) <-> HWIO (flax), depthwise (C, 1, kh, kw) <-> (kh, kw, 1, C);
PReLU slopes and `Scale` (1,) <-> (); attention temperature (heads, 1, 1) <-> (heads,).
Channel orders need no permutation: `fsmnet_jax.layers.pixel_unshuffle` / `pixel_shuffle` use
the reference's (c, dy, dx) order, so the 1x1 convs around them convert as they are.
"""

import collections
import functools
import re
from typing import Any, Mapping

import jax
import numpy as np
import torch

from fsmnet_jax.model import FSMNet, abstract_params
from fsmnet_jax.model import infer_model_from_params as infer_model_from_flax

# Per block type: regex rewrites from a Flax path inside the block to the torch key suffix.
_BLOCK_RULES = {
    'conv_act': [(r'^conv/kernel$', 'layers.weight'), (r'^prelu/negative_slope$', 'act.weight')],
    'down': [(r'^conv/conv/', 'layers.0.layers.'), (r'^proj/conv/', 'layers.2.layers.')],
    'up': [(r'^conv/', '0.'), (r'^prelu/negative_slope$', '2.weight')],
    'fre': [(r'^(amp|pha)_fuse_0/', r'\1_fuse.0.'), (r'^(amp|pha)_fuse_1/', r'\1_fuse.2.')],
    'res': [(r'^res_block_(\d+)/conv_(\d+)/', r'body.\1.layers.\2.layers.'),
            (r'^tail/conv/', 'body.{n}.layers.'), (r'^tail/prelu/negative_slope$', 'body.{n}.act.weight')],
    'fusion': [(r'^fuse_(\d)/', r'fuse.\1.')],
}
MODEL_ATTRIBUTES = ('num_features', 'num_res_blocks', 'num_heads', 'use_frequency_branch',
                    'use_cms_fusion', 'use_fs_fusion', 'use_spa_att')


class ConversionError(ValueError):
  """A state_dict or variable tree that does not fit the model; names every offending key."""


def torch_key(flax_path: tuple[str, ...], stage_has_resample: bool, num_res_blocks: int) -> str:
  """The reference state_dict key of the Flax parameter at `flax_path` (under 'params')."""
  top, rest = flax_path[0], '/'.join(flax_path[1:])
  fusion = re.fullmatch(r'(conv_fuse(?:_fre|_spa)?)_(\d+)', top)
  if fusion:
    prefix, block = f'{fusion.group(1)}.{fusion.group(2)}.', 'fusion'
  elif top.startswith(('head', 'tail')):  # a ConvBNReLU2D in a one-element Sequential
    prefix, block = f'{top}.0.', 'conv_act'
  else:  # a Stage: Sequential(resample?, block)
    part, rest = rest.split('/', 1)
    prefix = f'{top}.{1 if part == "block" and stage_has_resample else 0}.'
    if part == 'resample':
      block = 'down' if top.startswith('down') else 'up'
    else:
      block = 'fre' if '_fre' in top else 'res'
  for pattern, replacement in _BLOCK_RULES[block]:
    rest = re.sub(pattern, replacement.replace('{n}', str(num_res_blocks)), rest)
  return prefix + rest.replace('kernel', 'weight').replace('/', '.')


def _torch_shape(flax_shape: tuple[int, ...], key: str) -> tuple[int, ...]:
  if len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  if key.endswith('temperature'):
    return (*flax_shape, 1, 1)
  return flax_shape or (1,)


def model_attributes(model: FSMNet) -> dict[str, Any]:
  """The constructor arguments shared by `FSMNet` and `TorchFSMNet`."""
  return {name: getattr(model, name) for name in MODEL_ATTRIBUTES}


@functools.lru_cache(maxsize=16)
def key_map(model: FSMNet) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]:
  """torch key -> (Flax path under 'params', Flax shape, torch shape), in the reference's order."""
  from torch_port.model import TorchFSMNet  # pylint: disable=import-outside-toplevel

  shapes = abstract_params(model)
  entries = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(p.key for p in path)
    key = torch_key(names, 'resample' in shapes[names[0]], model.num_res_blocks)
    entries[key] = (names, tuple(leaf.shape), _torch_shape(tuple(leaf.shape), key))
  order = TorchFSMNet(**model_attributes(model)).state_dict().keys()
  assert set(order) == set(entries), 'TorchFSMNet and FSMNet disagree on the parameter set'
  return {k: entries[k] for k in order}


def infer_model(state_dict: Mapping[str, Any], use_spa_att: bool = False) -> FSMNet:
  """The `FSMNet` whose parameters a reference-format state_dict holds."""
  if 'head.0.layers.weight' not in state_dict:
    raise ConversionError('not an FSMNet state_dict: it has no "head.0.layers.weight" (first '
                          f'keys: {list(state_dict)[:5]})')
  res_blocks = {m.group(1) for k in state_dict
                if (m := re.fullmatch(r'down1\.1\.body\.(\d+)\.layers\.0\.layers\.weight', k))}
  temperature = state_dict.get('conv_fuse.0.fre_att.temperature')
  return FSMNet(
      num_features=int(state_dict['head.0.layers.weight'].shape[0]),
      num_res_blocks=len(res_blocks),
      num_heads=int(temperature.shape[0]) if temperature is not None else FSMNet.num_heads,
      use_frequency_branch='head_fre.0.layers.weight' in state_dict,
      use_cms_fusion='conv_fuse_spa.0.t1.weight' in state_dict,
      use_fs_fusion='conv_fuse.0.fre.weight' in state_dict,
      use_spa_att=use_spa_att)


def _raise_if_mismatched(expected: Mapping[str, tuple], given: Mapping[str, tuple], what: str):
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  wrong = [f'{k}: expected {expected[k]}, got {given[k]}' for k in expected
           if k in given and tuple(expected[k]) != tuple(given[k])]
  problems = []
  if missing:
    problems.append(f'missing {len(missing)}: {", ".join(missing)}')
  if unexpected:
    problems.append(f'unexpected {len(unexpected)}: {", ".join(unexpected)}')
  if wrong:
    problems.append(f'wrong shape {len(wrong)}: {"; ".join(wrong)}')
  if problems:
    raise ConversionError(f'{what} does not match the model: ' + ' | '.join(problems))


def torch_to_flax(state_dict: Mapping[str, torch.Tensor], model: FSMNet | None = None) -> dict:
  """Flax variables {'params': ...} for `FSMNet` from a reference-format state_dict."""
  model = model or infer_model(state_dict)
  try:
    mapping = key_map(model)
  except ValueError as e:  # keys missing make an inferred model that cannot exist
    raise ConversionError(f'the state_dict describes no valid FSMNet: {e}') from e
  _raise_if_mismatched({k: v[2] for k, v in mapping.items()},
                       {k: tuple(v.shape) for k, v in state_dict.items()}, 'state_dict')
  params: dict = {}
  for key, (path, flax_shape, _) in mapping.items():
    value = state_dict[key].detach().cpu().numpy()
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value.reshape(flax_shape).copy()  # copy: contiguous, owns its memory
  return {'params': params}


def flax_to_torch(variables: Mapping[str, Any], model: FSMNet | None = None
                  ) -> 'collections.OrderedDict[str, torch.Tensor]':
  """A reference-format state_dict (keys in the reference's order) from Flax variables."""
  params = variables['params'] if 'params' in variables else variables
  if model is None:
    try:
      model = infer_model_from_flax(params)
    except ValueError as e:
      raise ConversionError(str(e)) from None
  mapping = key_map(model)
  flat = {path: np.asarray(v) for path, v in (
      (tuple(p.key for p in kp), v) for kp, v in jax.tree_util.tree_flatten_with_path(params)[0])}
  _raise_if_mismatched({'/'.join(v[0]): v[1] for v in mapping.values()},
                       {'/'.join(p): v.shape for p, v in flat.items()}, 'Flax variables')
  state_dict = collections.OrderedDict()
  for key, (path, _, torch_shape) in mapping.items():
    value = flat[path]
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    state_dict[key] = torch.from_numpy(value.reshape(torch_shape).copy(order="C"))
  return state_dict
