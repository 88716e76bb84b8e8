"""The README and docs/ name what exists, and every console script's --help lists its options."""

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
CONSOLE_SCRIPTS = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']

# Options each command defines now (absl flag names, argparse long options without dashes): the
# code may add options, never lose these. Subcommands are 'command subcommand'.
_CHECKPOINT_OPTIONS = {'checkpoint', 'config', 'overwrite', 'debug', 'out', 'batch-size'}
_CONVERT_OPTIONS = {'use-spa-att', 'check-size', 'check-seed'}
MINIMUM_OPTIONS = {
    'fsmnet-train': {'config', 'workdir', 'distributed', 'coordinator_address', 'num_processes',
                     'process_id', 'debug'},
    'fsmnet-eval': {'config', 'checkpoint', 'split', 'out', 'data_consistency', 'num_panels',
                    'overwrite', 'debug'},
    'fsmnet-reconstruct': _CHECKPOINT_OPTIONS | {'t1', 't2', 'kspace', 'reference',
                                                 'acceleration', 'seed', 'data-consistency'},
    'fsmnet-export': _CHECKPOINT_OPTIONS | {'image-size', 'platforms'},
    'fsmnet-make-demo-data': {'seed', 'subjects', 'knee-pairs', 'image-size', 'slices', 'debug'},
    'fsmnet-convert': {'debug'},
    'fsmnet-parity': {'debug'},
    'fsmnet-convert torch2flax': _CONVERT_OPTIONS | {'overwrite'},
    'fsmnet-convert flax2torch': _CONVERT_OPTIONS | {'overwrite'},
    'fsmnet-parity forward': {'use-spa-att', 'size', 'seed'},
    'fsmnet-parity train': {'config', 'frameworks', 'seeds', 'steps', 'float64', 'noise-seeds',
                            'out'},
    'fsmnet-parity ablation': {'config', 'frameworks', 'seeds', 'steps', 'rows', 'out'},
    'fsmnet-bench': {'json', 'repeats', 'threads', 'frameworks', 'sweep', 'with-main', 'bf16',
                     'whole-batch', 'quick'},
}

# Run in a subprocess per command (absl refuses a flag defined twice in one process): prints the
# options the command's code defines, as JSON. absl commands: the key flags of the console
# script's module. argparse commands: the parser the entry point builds, caught where it would
# parse the command line.
_DEFINED_OPTIONS = r'''
import argparse, importlib, json, sys
from absl import flags

name, target = sys.argv[1:3]
module_name, function_name = target.split(':')
parsers = []


class _Caught(BaseException):
  """Raised instead of parsing the command line."""


def _catch(self, *args, **kwargs):
  parsers.append(self)
  raise _Caught


argparse.ArgumentParser.parse_args = _catch
argparse.ArgumentParser.parse_known_args = _catch
module = importlib.import_module(module_name)
key_flags = flags.FLAGS.get_key_flags_for_module(module)
if key_flags:
  print(json.dumps({'kind': 'absl', 'options': sorted(f.name for f in key_flags),
                    'subcommands': {}}))
  sys.exit(0)


def _long_options(parser):
  return sorted(option[2:] for action in parser._actions
                if not isinstance(action, argparse._HelpAction)
                for option in action.option_strings if option.startswith('--'))


sys.argv = [name]
try:
  getattr(module, function_name)()
except _Caught:
  pass
if not parsers:
  sys.exit(f'{target} neither defines absl flags nor parses its arguments with argparse')
parser = parsers[0]
subcommands, seen = {}, set()
for action in parser._actions:
  if isinstance(action, argparse._SubParsersAction):
    for sub_name, sub_parser in action.choices.items():
      if id(sub_parser) not in seen:  # aliases share their parser
        seen.add(id(sub_parser))
        subcommands[sub_name] = _long_options(sub_parser)
print(json.dumps({'kind': 'argparse', 'options': _long_options(parser),
                  'subcommands': subcommands}))
'''


def _console_script(name: str) -> str:
  """The installed executable of console script `name`."""
  beside_python = Path(sys.executable).with_name(name)
  found = str(beside_python) if beside_python.exists() else shutil.which(name)
  if found is None:
    pytest.fail(f'{name} is not installed (pip install -e .)')
  return found


@functools.cache
def _help(command: str) -> str:
  """The --help text of `command` ('fsmnet-x' or 'fsmnet-x subcommand'), run once per test
  worker."""
  name, *subcommand = command.split()
  done = subprocess.run([_console_script(name), *subcommand, '--help'], capture_output=True,
                        text=True, timeout=120, check=False, cwd=ROOT)
  assert done.returncode == 0, f'{command} --help: {done.stderr}'
  return done.stdout


def _listed_options(help_text: str) -> set[str]:
  """Option names listed in a --help text, after its 'options:' or 'flags:' heading."""
  heading = re.search(r'^(options|optional arguments|flags):$', help_text, re.MULTILINE)
  assert heading, help_text
  listed = re.findall(r'^  (?:-\w, )?--(?:\[no\])?([\w-]+)', help_text[heading.end():],
                      re.MULTILINE)
  return set(listed) - {'help'}


@functools.cache
def _defined_options(name: str) -> dict:
  """{'kind', 'options', 'subcommands'}: the options console script `name`'s code defines."""
  done = subprocess.run([sys.executable, '-c', _DEFINED_OPTIONS, name, CONSOLE_SCRIPTS[name]],
                        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)
  assert done.returncode == 0, f'{name}: {done.stderr}'
  return json.loads(done.stdout.strip().splitlines()[-1])


def _without_code_blocks(text: str) -> str:
  """Markdown text with its fenced code blocks removed."""
  return re.sub(r'^```.*?^```', '', text, flags=re.MULTILINE | re.DOTALL)


def _invocations(text: str) -> list[str]:
  """Every console-script invocation written in a code block or a code span of `text`."""
  lines = []
  for block in re.findall(r'^```[^\n]*\n(.*?)^```', text, re.MULTILINE | re.DOTALL):
    lines += re.sub(r'\\\n', ' ', block).splitlines()  # continuation lines joined
  lines = [re.sub(r'\s#.*', '', line) for line in lines]  # shell comments dropped
  lines += [span.replace('\n', ' ')
            for span in re.findall(r'`([^`]+)`', _without_code_blocks(text))]
  # From a command's name to the next command, `&&`, `;` or `|`.
  return [found.group(0) for line in lines
          for found in re.finditer(r'\bfsmnet-[a-z-]+\b(?:(?!\bfsmnet-[a-z]|&&|;|\|).)*', line)]


def _slug(heading: str) -> str:
  """The anchor GitHub gives a Markdown heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(path: Path) -> set[str]:
  """The anchors of every heading in Markdown file `path`."""
  anchors = set()
  for heading in re.findall(r'^#+ (.+)$', _without_code_blocks(path.read_text()), re.MULTILINE):
    slug = _slug(heading)
    anchor, n = slug, 0
    while anchor in anchors:  # repeated headings get -1, -2, ...
      n += 1
      anchor = f'{slug}-{n}'
    anchors.add(anchor)
  return anchors


@pytest.mark.parametrize('document', DOCUMENTS, ids=lambda p: p.name)
def test_documents_name_only_commands_and_files_that_exist(document):
  text = document.read_text()
  named = set(re.findall(r'\b(fsmnet-[a-z-]+)\b', text)) - {'fsmnet-jax'}  # the package
  assert named <= set(CONSOLE_SCRIPTS), named - set(CONSOLE_SCRIPTS)
  scripts = set(re.findall(r'\b(?:python|bash) (scripts/[\w./-]+)', text))
  if document.name == 'README.md':
    assert {'scripts/demo.sh', 'scripts/test.sh'} <= scripts
  assert all((ROOT / script).is_file() for script in scripts), scripts
  paths = set(re.findall(r'(?<![\w/.~-])((?:scripts|tests|configs|fsmnet_jax|torch_port|docs)'
                         r'/[\w./*-]*[\w/*])', text))
  missing = {path for path in paths if not list(ROOT.glob(path.rstrip('/')))}
  assert not missing, f'{document.name} names paths that do not exist: {sorted(missing)}'


@pytest.mark.parametrize('document', DOCUMENTS, ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(document):
  text = _without_code_blocks(document.read_text())
  broken = []
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target):  # https:, mailto:
      continue
    path, _, anchor = target.partition('#')
    linked = (document.parent / path).resolve() if path else document
    if not linked.exists():
      broken.append(target)
    elif anchor and linked.suffix == '.md' and anchor not in _anchors(linked):
      broken.append(f'{target} (no such heading)')
  assert not broken, f'{document.name}: broken links {broken}'


@pytest.mark.parametrize('name', sorted(CONSOLE_SCRIPTS))
def test_console_script_help_lists_its_options(name):
  text = _help(name)
  assert name in text  # a description that names the command, as its usage line does
  defined = _defined_options(name)
  assert set(defined['subcommands']) >= {command.split()[1] for command in MINIMUM_OPTIONS
                                         if command.startswith(f'{name} ')}
  commands = {name: defined['options']}
  commands.update({f'{name} {sub}': options for sub, options in defined['subcommands'].items()})
  for command, options in commands.items():
    listed = _listed_options(_help(command))
    assert listed == set(options), (
        f'{command}: defined but not in --help: {sorted(set(options) - listed)}; '
        f'in --help but not defined: {sorted(listed - set(options))}')
    assert MINIMUM_OPTIONS.get(command, set()) <= listed, (
        f'{command} lost options: {sorted(MINIMUM_OPTIONS[command] - listed)}')


@pytest.mark.parametrize('name', sorted(CONSOLE_SCRIPTS))
def test_documented_invocations_use_only_real_options(name):
  subcommands = set(_defined_options(name)['subcommands'])
  wrong = []
  for document in DOCUMENTS:
    for invocation in _invocations(document.read_text()):
      command, *words = invocation.split()
      if command != name:
        continue
      listed = _listed_options(_help(name))
      if words and words[0] in subcommands:
        listed |= _listed_options(_help(f'{name} {words[0]}'))
      used = {option.split('.')[0] for option in re.findall(r'(?<![\w-])--([\w.-]+)', invocation)}
      wrong += [f'{document.name}: --{option} in "{invocation}"' for option in used - listed]
  assert not wrong, wrong


@pytest.mark.parametrize('script', sorted({
    script for document in DOCUMENTS
    for script in re.findall(r'\bpython (scripts/[\w./-]+\.py)', document.read_text())}))
def test_documented_python_scripts_answer_help(script):
  done = subprocess.run([sys.executable, str(ROOT / script), '--help'], capture_output=True,
                        text=True, timeout=120, check=False, cwd=ROOT)
  assert done.returncode == 0 and 'usage:' in done.stdout, done.stderr
