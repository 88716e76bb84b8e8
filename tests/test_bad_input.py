"""Bad input to the command-line tools: one line naming the problem, a non-zero exit code, no
traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {'fsmnet-train': ['--workdir', 'unused_workdir'],
            'fsmnet-eval': ['--checkpoint', 'unused_checkpoint']}


def _run(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
  script = Path(sys.executable).with_name(command)
  return subprocess.run([str(script), *args, *REQUIRED[command]], capture_output=True, text=True,
                        timeout=120, check=False, cwd=cwd)


def _error_lines(stderr: str) -> list[str]:
  # jax may log a line about the accelerators it looked for; everything else is ours.
  return [line for line in stderr.splitlines() if line and 'xla_bridge' not in line]


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_missing_config_file_is_one_line(command, tmp_path):
  done = _run(command, '--config', str(tmp_path / 'nowhere.py'), cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f"{command}: error: --config: [Errno 2] No such file or directory: "
      f"'{tmp_path / 'nowhere.py'}'"]
  assert not (tmp_path / 'unused_workdir').exists()


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_unknown_config_key_is_one_line(command, tmp_path):
  done = _run(command, '--config', str(ROOT / 'configs' / 'default.py'),
              '--config.train.learning_rat=1e-3', cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f'{command}: error: --config.train.learning_rat: no such config key '
      f'(Did you mean "learning_rate" instead of "learning_rat"?)']
  assert not (tmp_path / 'unused_workdir').exists()
