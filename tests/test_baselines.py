"""MDUNet, the paper's multi-modal U-Net baseline: the reference's size, its pieces as PyTorch
computes them, and its place in the configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax import train
from fsmnet_jax.baselines import MDUNet, TransposeConvBlock, instance_norm
from fsmnet_jax.configs import tiny
from fsmnet_jax.model import abstract_params, build_model, count_params, init_variables

# The reference's mmUnet(input_dim=2, output_dim=1, chans=32, num_pool_layers=4), counted from
# its layers: encoder 1,171,008 + bottleneck 3,538,944 + transposed convolutions 696,320 +
# decoder 2,350,080 + output 33.
REFERENCE_PARAMETERS = 7_756_385


def test_mdunet_has_the_reference_size_and_one_output():
  assert count_params(abstract_params(MDUNet(num_features=32))) == REFERENCE_PARAMETERS
  tiny_unet = MDUNet(num_features=4)
  x = jnp.asarray(np.random.default_rng(0).random((2, 32, 48, 1)), jnp.float32)
  variables = init_variables(tiny_unet, jax.random.PRNGKey(1))
  outputs = jax.jit(tiny_unet.apply)(variables, x, x)
  assert set(outputs) == {'img_out'} and outputs['img_out'].shape == (2, 32, 48, 1)
  with pytest.raises(ValueError, match='MDUNet needs image sides divisible by 16'):
    jax.eval_shape(tiny_unet.apply, variables, x[:, :24], x[:, :24])


def test_instance_norm_and_transposed_convolution_are_torchs():
  torch = pytest.importorskip('torch')
  from torch_port.model import from_nhwc, to_nhwc  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 5))
  np.testing.assert_allclose(instance_norm(jnp.asarray(x, jnp.float32)),
                             to_nhwc(torch.nn.functional.instance_norm(from_nhwc(x))),
                             rtol=0, atol=2e-6)
  block = TransposeConvBlock(features=3)
  params = block.init(jax.random.PRNGKey(0), jnp.asarray(x, jnp.float32))['params']
  kernel = np.asarray(params['kernel'], np.float64)  # (2, 2, in, out)
  # PyTorch's ConvTranspose2d bound: 1 / sqrt(fan_in), its fan_in being out_channels * 2 * 2.
  assert 0.9 / np.sqrt(3 * 4) < np.abs(kernel).max() <= 1 / np.sqrt(3 * 4)
  expected = torch.nn.functional.leaky_relu(torch.nn.functional.instance_norm(
      torch.nn.functional.conv_transpose2d(from_nhwc(x), torch.from_numpy(
          kernel.transpose(2, 3, 0, 1)), stride=2)), 0.2)
  np.testing.assert_allclose(block.apply({'params': params}, jnp.asarray(x, jnp.float32)),
                             to_nhwc(expected), rtol=0, atol=2e-6)


def test_model_name_selects_the_network_and_its_size_multiple():
  config = tiny.get_config()
  assert type(build_model(config)).__name__ == 'FSMNet'
  config.model_name = 'mdunet'
  assert build_model(config) == MDUNet(config.model.num_features)
  mesh = train.make_mesh(config)
  config.data.image_size = 40  # a multiple of FSMNet's 8, not of MDUNet's 16
  with pytest.raises(train.ConfigError, match='image_size=40 must be divisible by 16'):
    train.check_config(config, mesh)
  config.model_name = 'unet'
  with pytest.raises(train.ConfigError, match="model_name='unet': use one of fsmnet, mdunet"):
    train.check_config(config, mesh)
