"""The README's commands exist, and every console script answers --help completely."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
CONSOLE_SCRIPTS = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']


def _console_script(name: str) -> str:
  beside_python = Path(sys.executable).with_name(name)
  found = str(beside_python) if beside_python.exists() else shutil.which(name)
  if found is None:
    pytest.fail(f'{name} is not installed (pip install -e .)')
  return found


def test_readme_names_only_commands_that_exist():
  named = set(re.findall(r'\b(fsmnet-[a-z-]+)\b', README)) - {'fsmnet-jax'}  # the package
  assert named and named <= set(CONSOLE_SCRIPTS), named - set(CONSOLE_SCRIPTS)
  scripts = set(re.findall(r'\b(?:python|bash) (scripts/[\w./-]+)', README))
  assert {'scripts/demo.sh', 'scripts/test.sh'} <= scripts
  assert all((ROOT / script).is_file() for script in scripts), scripts


@pytest.mark.parametrize('name', sorted(CONSOLE_SCRIPTS))
def test_console_script_help_lists_its_options(name):
  done = subprocess.run([_console_script(name), '--help'], capture_output=True, text=True,
                        timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  text = done.stdout
  assert name in text  # a description that names the command, as its usage line does
  # Every option the command defines is listed with its help (absl or argparse).
  options = re.findall(r'^\s+(--[\w-]+|-\w, --[\w-]+|--\[no\][\w-]+)', text, re.MULTILINE)
  assert len(options) >= 2, text


@pytest.mark.parametrize('script', sorted(set(re.findall(r'\bpython (scripts/[\w./-]+\.py)',
                                                         README))))
def test_readme_python_scripts_answer_help(script):
  done = subprocess.run([sys.executable, str(ROOT / script), '--help'], capture_output=True,
                        text=True, timeout=120, check=False, cwd=ROOT)
  assert done.returncode == 0 and 'usage:' in done.stdout, done.stderr
