"""Reference PyTorch checkpoint files (torch_port.checkpoint): safe reading, atomic writing, clear
errors."""

import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from fsmnet_jax.checkpoint import CheckpointError
from torch_port import TorchFSMNet
from torch_port.checkpoint import load_state_dict, save_state_dict


@pytest.fixture(scope='module')
def tiny_state_dict():
  torch.manual_seed(0)
  return TorchFSMNet(num_features=8, num_res_blocks=1, num_heads=2).state_dict()


@pytest.mark.parametrize('wrap', ['bare', 'network', 'state_dict', 'model', 'data_parallel'])
def test_reads_reference_checkpoint_layouts(tmp_path, tiny_state_dict, wrap):
  content = dict(tiny_state_dict)
  if wrap == 'data_parallel':
    content = {'network': {f'module.{k}': v for k, v in content.items()}, 'iteration': 5}
  elif wrap != 'bare':
    content = {wrap: content, 'epoch': 3, 'optimizer': {'lr': 1e-4}}
  path = tmp_path / 'ref.pth'
  torch.save(content, path)
  loaded = load_state_dict(path)
  assert list(loaded) == list(tiny_state_dict)
  assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_writes_and_refuses_to_overwrite(tmp_path, tiny_state_dict, suffix):
  path = tmp_path / f'out{suffix}'
  save_state_dict(tiny_state_dict, path)
  loaded = load_state_dict(path)
  assert all(torch.equal(loaded[k], v) for k, v in tiny_state_dict.items())
  before = path.read_bytes()
  with pytest.raises(FileExistsError, match='already exists; pass --overwrite'):
    save_state_dict({k: v + 1 for k, v in tiny_state_dict.items()}, path)
  assert path.read_bytes() == before
  save_state_dict({k: v + 1 for k, v in tiny_state_dict.items()}, path, overwrite=True)
  assert path.read_bytes() != before
  assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary files left


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('echo pwned > /dev/null',))


def test_refuses_pickled_code(tmp_path):
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    pickle.dump({'network': _RunsCode()}, f)
  with pytest.raises(CheckpointError, match=r'evil.pth: refused: .*weights_only=True'):
    load_state_dict(path)
  torch.save({'network': _RunsCode()}, path)  # the zip format: torch names what it blocked
  with pytest.raises(CheckpointError, match=r'evil.pth: refused: .*GLOBAL'):
    load_state_dict(path)


def test_bad_files_give_clear_errors(tmp_path, tiny_state_dict):
  with pytest.raises(CheckpointError, match='missing.pth: no such file'):
    load_state_dict(tmp_path / 'missing.pth')
  good = tmp_path / 'good.pth'
  torch.save(tiny_state_dict, good)
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  with pytest.raises(CheckpointError, match='truncated.pth: not a readable PyTorch checkpoint'):
    load_state_dict(truncated)
  noise = tmp_path / 'noise.pth'
  noise.write_bytes(np.random.default_rng(0).bytes(300))
  with pytest.raises(CheckpointError, match=r'noise.pth: not a readable PyTorch checkpoint '
                                            r'\(neither .* zip format nor a pickle\)'):
    load_state_dict(noise)
  not_a_dict = tmp_path / 'tensor.pth'
  torch.save(torch.zeros(3), not_a_dict)
  with pytest.raises(CheckpointError, match=r'tensor.pth: not a state_dict \(holds a Tensor\)'):
    load_state_dict(not_a_dict)
  other = tmp_path / 'other.pth'
  torch.save({'epoch': 3, 'note': 'hello'}, other)
  with pytest.raises(CheckpointError, match='other.pth: not a state_dict'):
    load_state_dict(other)
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'\x00' * 20)
  with pytest.raises(CheckpointError, match='garbage.safetensors: not a readable safetensors'):
    load_state_dict(garbage)
