"""fsmnet-convert end to end: reference-format checkpoint -> Flax -> PyTorch, with checks."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from torch_port import TorchFSMNet
from torch_port.checkpoint import load_state_dict
from torch_port.cli import main


def test_round_trip_of_a_reference_format_checkpoint(tmp_path, capsys, reference_weights):
  _, state_dict = reference_weights
  source = tmp_path / 'fsmnet_brats.pth'
  torch.save({'network': {f'module.{k}': v for k, v in state_dict.items()}, 'iter': 100000},
             source)
  assert main(['torch2flax', str(source), str(tmp_path / 'flax')]) == 0
  out = capsys.readouterr().out
  assert '14,053,528 parameters in 832 tensors' in out
  assert 'PASS: float64 max rel < 1e-09' in out and 'img_fre: flax-f64 vs torch-f64' in out

  assert main(['flax2torch', str(tmp_path / 'flax'), str(tmp_path / 'back.safetensors'),
               '--check-size', '0']) == 0
  back = load_state_dict(tmp_path / 'back.safetensors')
  assert set(back) == set(state_dict)  # safetensors stores keys sorted
  assert all(torch.equal(back[k], v) for k, v in state_dict.items())
  TorchFSMNet().load_state_dict(back, strict=True)


def test_refuses_to_overwrite_and_reports_errors(tmp_path, capsys):
  tiny = TorchFSMNet(num_features=8, num_res_blocks=1, num_heads=2)
  source = tmp_path / 'tiny.pth'
  torch.save(tiny.state_dict(), source)
  destination = tmp_path / 'out.pth'
  destination.write_bytes(b'precious')
  assert main(['flax2torch', str(tmp_path), str(destination)]) == 2
  assert 'not a readable orbax checkpoint' in capsys.readouterr().err
  # The round trip above checks while converting; test_parity_cli.py has the check alone.
  assert main(['torch2flax', str(source), str(tmp_path / 'flax'), '--check-size', '0']) == 0
  capsys.readouterr()
  assert main(['flax2torch', str(tmp_path / 'flax'), str(destination), '--check-size', '0']) == 2
  assert 'already exists; pass --overwrite' in capsys.readouterr().err
  assert destination.read_bytes() == b'precious'
  assert main(['flax2torch', str(tmp_path / 'flax'), str(destination), '--overwrite',
               '--check-size', '0']) == 0
  assert destination.read_bytes() != b'precious'
  assert main(['torch2flax', str(tmp_path / 'nope.pth'), str(tmp_path / 'out')]) == 2
  assert 'nope.pth: no such file' in capsys.readouterr().err


def test_console_script_is_installed():
  executable = shutil.which('fsmnet-convert', path=str(Path(sys.executable).parent)) or \
      shutil.which('fsmnet-convert')
  assert executable, 'fsmnet-convert is not on PATH; install the package (scripts/test.sh does)'
  result = subprocess.run([executable, '--help'], capture_output=True, text=True, check=True)
  for command in ('torch2flax', 'flax2torch'):
    assert command in result.stdout
