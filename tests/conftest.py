"""Shared fixtures: reference-format weights with every scalar moved off its default."""

import pytest

torch = pytest.importorskip('torch')


def randomize_scalars(model: 'torch.nn.Module', seed: int) -> 'torch.nn.Module':
  """Moves PReLU slopes, Scale and attention temperatures off their init values, so that a
  mis-mapped scalar cannot hide behind identical defaults."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.numel() <= 16 and p.dim() in (1, 3):  # (1,) slopes and scales, (heads, 1, 1)
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
  return model


@pytest.fixture(scope='session')
def reference_weights():
  """(TorchFSMNet at the default size with random scalars, its state_dict)."""
  from torch_port import TorchFSMNet  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = randomize_scalars(TorchFSMNet(), seed=1).eval()
  return model, model.state_dict()
