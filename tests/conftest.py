"""Shared fixtures: reference-format weights with every scalar moved off its default, and the
demo data, compilation cache and initial parameters of the training tests.

torch is imported lazily so that the JAX-only tests run without the torch extra.
"""

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax.data.demo import make_demo_data
from fsmnet_jax.model import FSMNet
from training_runs import starting_params

CACHE_VARIABLE = 'FSMNET_TEST_XLA_CACHE'


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


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  """Demo data: 4 BraTS-layout subjects (1 for test) and 1 knee pair, 32 px, 8 slices."""
  root = tmp_path_factory.mktemp('demo') / 'data'
  make_demo_data(root, seed=0, num_subjects=4, num_knee_pairs=1, image_size=32, num_slices=8)
  return root


def pytest_configure(config):
  """One persistent XLA cache for the session, set before anything compiles: the parallel test
  workers (which inherit the controller's environment) and the commands they run compile each
  program once."""
  cache = os.environ.setdefault(CACHE_VARIABLE, tempfile.mkdtemp(prefix='fsmnet-test-xla-'))
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The slowest files (minutes each: fsmnet-train in subprocesses, the full-size model) are handed
# to the parallel workers first (scripts/test.sh keeps this order): xdist gives the first file to
# the first worker, the second to the second, a second file to each, then the next file to
# whichever is free: the heaviest (~10, ~11 and ~6 min summed on a 2-core Zen 3) start first.
SLOWEST_FILES = ('test_train.py', 'test_parity.py', 'test_train_resume.py', 'test_bench.py',
                 'test_model.py', 'test_inference.py', 'test_train_parity.py',
                 'test_parity_cli.py', 'test_object_store.py',
                 'test_train_step.py', 'test_bad_input.py', 'test_export.py',
                 'test_demo_data.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  if not hasattr(config, 'workerinput'):  # the controller, or a run without workers
    shutil.rmtree(os.environ.pop(CACHE_VARIABLE), ignore_errors=True)


@pytest.fixture(scope='session')
def compile_cache():
  """The session's persistent XLA cache folder, for the commands the tests run."""
  return Path(os.environ[CACHE_VARIABLE])


@pytest.fixture(scope='module')
def initial_params():
  """The tiny model's initial parameters, as create_train_state draws them."""
  config = tiny.get_config()
  return starting_params(FSMNet(**config.model), config.seed)


@pytest.fixture(scope='module')
def tiny_model_and_params(initial_params):
  """(the tiny config's FSMNet, its initial parameters)."""
  return FSMNet(**tiny.get_config().model), initial_params
