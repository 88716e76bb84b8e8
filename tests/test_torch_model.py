"""TorchFSMNet has exactly the reference's state_dict format."""

from pathlib import Path

import pytest

torch = pytest.importorskip('torch')

from torch_port import TorchFSMNet  # pylint: disable=wrong-import-position

REFERENCE_KEYS = Path(__file__).parent / 'data' / 'reference_state_dict.txt'


def _reference_format():
  lines = [l for l in REFERENCE_KEYS.read_text().splitlines() if not l.startswith('#')]
  return [(key, tuple(int(n) for n in shape.strip('()').split(',') if n.strip()))
          for key, shape in (l.split(' ', 1) for l in lines)]


def test_state_dict_matches_the_reference_key_for_key():
  state_dict = TorchFSMNet().state_dict()
  expected = _reference_format()
  assert len(expected) == 832
  assert [(k, tuple(v.shape)) for k, v in state_dict.items()] == expected
  assert sum(v.numel() for v in state_dict.values()) == 14_053_528


def test_loads_a_reference_format_checkpoint_strictly():
  reference = {key: torch.randn(shape) for key, shape in _reference_format()}
  model = TorchFSMNet()
  model.load_state_dict(reference, strict=True)
  assert torch.equal(model.state_dict()['conv_fuse.13.fuse.1.bias'], reference['conv_fuse.13.fuse.1.bias'])
  with pytest.raises(RuntimeError, match='Missing key'):
    TorchFSMNet().load_state_dict({k: v for k, v in reference.items() if k != 'tail.0.act.weight'})


def test_forward_shapes_and_spa_att_unused():
  model = TorchFSMNet(num_features=8, num_res_blocks=1, num_heads=2)
  main, aux = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
  out = model(main, aux)
  assert set(out) == {'img_out', 'img_fre'}
  assert all(v.shape == (2, 1, 32, 32) for v in out.values())
  (out['img_out'].mean() + out['img_fre'].mean()).backward()
  unused = [n for n, p in model.named_parameters() if p.grad is None]
  assert unused and all('.spa_att.' in n for n in unused)
  assert len(unused) == 14 * 6
