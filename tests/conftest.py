"""Shared fixtures: reference-format weights with every scalar moved off its default.

torch is imported lazily so that the JAX-only tests run without the torch extra.
"""

import pytest


def randomize_scalars(model, seed: int):
  """Moves PReLU slopes, Scale and attention temperatures off their init values, so that a
  mis-mapped scalar cannot hide behind identical defaults."""
  import torch  # pylint: disable=import-outside-toplevel
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.numel() <= 16 and p.dim() in (1, 3):  # (1,) slopes and scales, (heads, 1, 1)
        p.copy_(0.5 + torch.rand(p.shape, generator=generator))
  return model


@pytest.fixture(scope='session')
def reference_weights():
  """(TorchFSMNet at the default size with random scalars, its state_dict)."""
  torch = pytest.importorskip('torch')
  from torch_port import TorchFSMNet  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  model = randomize_scalars(TorchFSMNet(), seed=1).eval()
  return model, model.state_dict()
