"""Every configs/*.py file: loads by path as the commands load it, passes the checks a run makes
before any work, and builds its model; the paper's settings are what the paper states."""

import functools
from pathlib import Path

import jax
import pytest

from fsmnet_jax import train
from fsmnet_jax.cli.common import CONFIG_DIR, load_config_file
from fsmnet_jax.model import FSMNet, FSMNetTiny, count_params, init_variables

CONFIGS = sorted(p.stem for p in Path(CONFIG_DIR).glob('*.py') if p.stem != '__init__')
# The paper's four settings: data set, acceleration, sampled centre fraction (fastMRI's 0.08 at
# 4x, 0.04 at 8x), and the slice size (BraTS 240x240, fastMRI knee 320x320).
PAPER_SETTINGS = {
    'brats_4x': ('brats', 4, 0.08, 240),
    'brats_8x': ('brats', 8, 0.04, 240),
    'fastmri_4x': ('fastmri', 4, 0.08, 320),
    'fastmri_8x': ('fastmri', 8, 0.04, 320),
}
# Data sets the paper does not train on, with the paper's recipe: data set, acceleration, centre
# fraction, slice size.
OTHER_DATA_SETS = {'ixi_4x': ('ixi', 4, 0.08, 256), 'm4raw_4x': ('m4raw', 4, 0.08, 256)}
REFERENCE_NUM_PARAMS = 14_053_528  # the reference's state_dict at the default size


@functools.cache
def _num_params(model: FSMNet) -> int:
  return count_params(jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))


def test_the_paper_configs_are_all_there():
  assert set(PAPER_SETTINGS) | set(OTHER_DATA_SETS) | {'default', 'demo', 'tiny'} == set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_a_config_loads_passes_the_run_checks_and_builds_its_model(name):
  config = load_config_file(CONFIG_DIR / f'{name}.py')
  train.check_config(config, train.make_mesh(config))  # raises ConfigError naming the key
  model = FSMNet(**config.model)
  assert _num_params(model) > 0
  if name not in ('default', 'tiny'):  # its docstring gives the command that uses it
    assert f'--config configs/{name}.py' in (CONFIG_DIR / f'{name}.py').read_text()
  if name == 'tiny':
    assert model == FSMNetTiny()


@pytest.mark.parametrize('name', sorted(PAPER_SETTINGS | OTHER_DATA_SETS))
def test_the_data_set_configs_train_the_papers_model_with_its_recipe(name):
  config = load_config_file(CONFIG_DIR / f'{name}.py')
  dataset, acceleration, center_fraction, image_size = (PAPER_SETTINGS | OTHER_DATA_SETS)[name]
  assert (config.data.dataset, config.data.acceleration, config.data.center_fraction,
          config.data.image_size) == (dataset, acceleration, center_fraction, image_size)
  model = FSMNet(**config.model)
  assert model == FSMNet()
  assert _num_params(model) == REFERENCE_NUM_PARAMS
  # The reference code's recipe: batch 4, AdamW at 1e-4 halved every 20k of 100k steps (the
  # paper says x0.1: --config.train.schedule=paper), gradient norm clipped at 0.01.
  assert (config.train.batch_size, config.train.num_steps, config.train.learning_rate,
          config.train.decay_every, config.train.schedule, config.train.clip_norm) == (
              4, 100_000, 1e-4, 20_000, 'reference', 0.01)


@pytest.mark.parametrize('key,value,problem', [
    ('data.acceleration', 0, 'config.data.acceleration=0 must be above 1'),
    ('data.acceleration', 1, 'config.data.acceleration=1 must be above 1'),
    ('data.mask_type', 'randomm', "config.data.mask_type='randomm': use one of random, "),
    ('train.num_steps', 0, 'config.train.num_steps=0 must be at least 1')])
def test_a_setting_that_cannot_run_is_refused_before_any_work(key, value, problem):
  config = load_config_file(CONFIG_DIR / 'tiny.py')
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(train.ConfigError, match=problem):
    train.check_settings(config)
