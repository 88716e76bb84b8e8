"""Weight conversion: explicit layouts, strict key checks, bit-exact round trips."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from fsmnet_jax.model import FSMNet, FSMNetTiny, init_variables
from torch_port import TorchFSMNet
from torch_port.convert import (ConversionError, flax_to_torch, infer_model,
                                infer_model_from_flax, model_attributes, torch_to_flax)


def test_layouts_are_explicit(reference_weights):
  _, state_dict = reference_weights
  params = torch_to_flax(state_dict)['params']
  as_numpy = lambda key: state_dict[key].numpy()
  # OIHW -> HWIO
  np.testing.assert_array_equal(params['down1_fre']['block']['amp_fuse_1']['kernel'],
                                as_numpy('down1_fre.1.amp_fuse.2.weight').transpose(2, 3, 1, 0))
  # depthwise (C, 1, 3, 3) -> (3, 3, 1, C)
  depthwise = params['conv_fuse_4']['fre_att']['kv_dwconv']['kernel']
  assert depthwise.shape == (3, 3, 1, 128)
  np.testing.assert_array_equal(depthwise[1, 2, 0, 77], as_numpy('conv_fuse.4.fre_att.kv_dwconv.weight')[77, 0, 1, 2])
  # the 1x1 conv after the (c, dy, dx) pixel unshuffle keeps its input-channel order
  np.testing.assert_array_equal(params['down2']['resample']['proj']['conv']['kernel'][0, 0],
                                as_numpy('down2.0.layers.2.layers.weight')[:, :, 0, 0].T)
  # scalars (1,) -> () and temperature (heads, 1, 1) -> (heads,)
  assert params['up1']['resample']['prelu']['negative_slope'].shape == ()
  assert float(params['up1']['resample']['prelu']['negative_slope']) == float(as_numpy('up1.0.2.weight')[0])
  assert float(params['neck_T1']['block']['re_scale']['scale']) == float(as_numpy('neck_T1.0.re_scale.scale')[0])
  assert float(params['neck_T1']['block']['tail']['prelu']['negative_slope']) == float(
      as_numpy('neck_T1.0.body.2.act.weight')[0])
  np.testing.assert_array_equal(params['conv_fuse_9']['spa_att']['temperature'],
                                as_numpy('conv_fuse.9.spa_att.temperature')[:, 0, 0])
  assert params['tail_fre']['conv']['kernel'].shape == (3, 3, 64, 1)


def test_round_trips_are_bit_identical(reference_weights):
  _, state_dict = reference_weights
  back = flax_to_torch(torch_to_flax(state_dict))
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    assert back[key].dtype == value.dtype and torch.equal(back[key], value), key

  variables = init_variables(FSMNet(), jax.random.key(3))
  again = torch_to_flax(flax_to_torch(variables))
  flat, flat_again = (dict(jax.tree_util.tree_leaves_with_path(v)) for v in (variables, again))
  assert flat.keys() == flat_again.keys()
  for path, value in flat.items():
    assert flat_again[path].dtype == value.dtype
    np.testing.assert_array_equal(flat_again[path], value, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('attributes', [
    dict(num_features=8, num_res_blocks=1, num_heads=2),
    dict(num_features=16, num_res_blocks=3, num_heads=4, use_cms_fusion=False),
    dict(num_features=8, num_res_blocks=1, num_heads=2, use_fs_fusion=False),
    dict(num_features=8, num_res_blocks=2, num_heads=2, use_frequency_branch=False,
         use_fs_fusion=False),
])
def test_variants_convert_and_are_inferred(attributes):
  torch_model = TorchFSMNet(**attributes)
  model = infer_model(torch_model.state_dict())
  if not attributes.get('use_fs_fusion', True):  # no attention: heads leave no trace
    attributes = dict(attributes, num_heads=FSMNet.num_heads)
  assert model == FSMNet(**attributes)
  variables = torch_to_flax(torch_model.state_dict())
  assert infer_model_from_flax(variables) == model
  TorchFSMNet(**model_attributes(model)).load_state_dict(flax_to_torch(variables), strict=True)


def test_strict_errors_name_every_offending_key(reference_weights):
  _, state_dict = reference_weights
  broken = dict(state_dict)
  del broken['conv_fuse.3.fre_att.q.weight']
  del broken['tail.0.act.weight']
  broken['conv_fuse.3.extra.weight'] = torch.zeros(1)
  broken['down2.1.re_scale.scale'] = torch.zeros(2)
  with pytest.raises(ConversionError) as error:
    torch_to_flax(broken)
  message = str(error.value)
  for expected in ('missing 2', 'conv_fuse.3.fre_att.q.weight', 'tail.0.act.weight',
                   'unexpected 1', 'conv_fuse.3.extra.weight', 'wrong shape 1',
                   'down2.1.re_scale.scale: expected (1,), got (2,)'):
    assert expected in message

  variables = init_variables(FSMNetTiny(), jax.random.key(0))
  del variables['params']['conv_fuse_2']['fuse_0']['bias']
  with pytest.raises(ConversionError, match='missing 1: conv_fuse_2/fuse_0/bias'):
    flax_to_torch(variables)
  with pytest.raises(ConversionError, match='not an FSMNet state_dict'):
    torch_to_flax({'encoder.weight': torch.zeros(3)})
  with pytest.raises(ConversionError, match='not FSMNet variables'):
    flax_to_torch({'params': {'dense': {'kernel': np.zeros((2, 2))}}})
