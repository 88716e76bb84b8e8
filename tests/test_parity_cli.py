"""fsmnet-parity: `forward` (one forward pass of both frameworks with a checkpoint's weights)
and `train` (runs per framework and seed, the report, resuming, bad input).

The training runs are the tiny FSMNet's spatial branch in float64 at lr 2e-3 with a decay after
step 2: the same-algorithm level must pass through the command as it does in
test_train_parity.py, and the machinery (workers, report, plots, resume) is the same for any
network.
"""

import contextlib
import io
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip('torch')

# pylint: disable=wrong-import-position
from fsmnet_jax import train
from fsmnet_jax.baselines import MDUNet
from fsmnet_jax.configs import tiny
from fsmnet_jax.model import abstract_params, count_params
from torch_port import TorchFSMNet
from torch_port import parity_cli
from torch_port.parity_cli import main
from torch_port.parity_report import noise_verdict, paired_difference, failed
from torch_port.parity_runs import TABLE2_ROWS, flatten, table2_config
from training_runs import SPATIAL_ONLY, compile_cache_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
TINY_RUN = ['--config', str(REPO / 'configs/tiny.py'), *SPATIAL_ONLY,
            '--config.eval.max_batches=1', '--config.eval.batch_size=4', '--config.eval.every=3',
            '--config.train.learning_rate=2e-3', '--config.train.decay_every=2',
            '--steps', str(STEPS), '--float64']


def _parity(*args: str) -> tuple[int, str, str]:
  """fsmnet-parity's (exit status, stdout, stderr), run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(list(args))
  return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope='module')
def two_seeds(tmp_path_factory, data_root, compile_cache):
  """A finished two-seed run: (its --out folder, the arguments that made it, its stdout)."""
  out = tmp_path_factory.mktemp('parity') / 'out'
  args = ['train', *TINY_RUN, f'--config.data.root={data_root}', '--seeds', '2',
          '--out', str(out)]
  with mock.patch.dict('os.environ', compile_cache_env(compile_cache)):
    status, stdout, stderr = _parity(*args)
  assert status == 0, stderr
  return out, args, stdout


def _snapshots(out: Path, name: str) -> dict[str, np.ndarray]:
  with np.load(out / 'runs' / name / 'snapshots.npz') as snapshots:
    return dict(snapshots)


def test_train_writes_the_report_of_every_run(two_seeds):
  out, _, stdout = two_seeds
  report = json.loads((out / 'report.json').read_text())
  runs = {(r['framework'], r['seed']): r for r in report['runs']}
  # Both frameworks for both seeds; the reference's own noise runs for the first seed.
  assert set(runs) == {('jax', 0), ('torch', 0), ('jax', 1), ('torch', 1),
                       ('torch-ulp', 0), ('torch-1thread', 0)}
  for run in runs.values():
    assert run['dtype'] == 'float64' and len(run['losses']) == STEPS
    assert run['learning_rates'] == [2e-3, 2e-3, 1e-3, 1e-3, 5e-4, 5e-4]
    assert set(run['evals']) == {'3', '6'} and run['eval'] == run['evals']['6']
    assert {'eval_psnr', 'eval_ssim', 'eval_nmse'} <= set(run['eval'])
  for seed in (0, 1):
    # Both frameworks start from the very same weights (the conversion is exact) ...
    jax_run, torch_run = (_snapshots(out, f'{f}-seed{seed}') for f in ('jax', 'torch'))
    np.testing.assert_array_equal(jax_run['step_0'], torch_run['step_0'])
    assert set(jax_run) == set(torch_run) == {f'step_{s}' for s in (0, 1, 2, 3, 5, 6)}
    # ... and follow the same algorithm: level 1, judged by the report.
    level = report['verdicts'][str(seed)]['same_algorithm']
    assert level['passed'], level
  np.testing.assert_raises(AssertionError, np.testing.assert_array_equal,
                           _snapshots(out, 'torch-seed0')['step_0'],
                           _snapshots(out, 'torch-seed1')['step_0'])
  # The one-ulp run starts one ulp up, and ends elsewhere.
  ulp, reference = _snapshots(out, 'torch-ulp-seed0'), _snapshots(out, 'torch-seed0')
  np.testing.assert_array_equal(ulp['step_0'], np.nextafter(reference['step_0'], np.inf))
  assert report['divergence']['0']['torch-ulp']['params']['6'] > 0
  assert 'same_numerics' in report['verdicts']['0']
  for metric in ('eval_psnr', 'eval_ssim'):
    interval = report['same_result'][metric]
    assert interval['seeds'] == 2 and interval['low'] <= interval['high'], interval
    assert interval['passed'], interval  # float64 runs of one algorithm end where they began
  assert report['results']['jax']['eval_psnr']['seeds'] == 2
  text = (out / 'report.md').read_text()
  assert '| jax | 2 |' in text and '## Seed 0: divergence from the reference' in text
  for plot in ('curves.png', 'divergence.png'):
    assert (out / plot).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'PASS' in stdout and 'report.md' in stdout


def test_train_again_keeps_finished_runs_and_redoes_missing_ones(two_seeds, compile_cache):
  out, args, _ = two_seeds
  kept = (out / 'runs' / 'jax-seed0' / 'run.json').read_bytes()
  redone = json.loads((out / 'runs' / 'torch-seed1' / 'run.json').read_text())
  shutil.rmtree(out / 'runs' / 'torch-seed1')
  with mock.patch.dict('os.environ', compile_cache_env(compile_cache)):
    status, stdout, stderr = _parity(*args)
  assert status == 0, stderr
  assert stdout.count('finished earlier, kept') == 5 and 'torch-seed1: done' in stdout
  assert (out / 'runs' / 'jax-seed0' / 'run.json').read_bytes() == kept
  again = json.loads((out / 'runs' / 'torch-seed1' / 'run.json').read_text())
  assert again['losses'] == redone['losses']  # the twin is deterministic on one machine


def test_train_refuses_bad_input_and_keeps_finished_runs(two_seeds, tmp_path):
  out, args, _ = two_seeds
  settings = (out / 'parity.json').read_bytes()
  finished = {p: p.read_bytes() for p in sorted((out / 'runs').glob('*/run.json'))}

  status, _, stderr = _parity(*args, '--frameworks', 'jax,tensorflow')
  assert status == 2 and stderr.count('\n') == 1
  assert 'unknown framework tensorflow; use jax, torch, torch-ulp, torch-1thread' in stderr
  status, _, stderr = _parity(*args, '--config.train.compute_dtype=bfloat16')
  assert status == 2 and "compute_dtype='bfloat16': the torch twin trains in float32" in stderr
  status, _, stderr = _parity(*args, '--config.model_name=mdunet')
  assert status == 2 and "model_name='mdunet': the torch twin is FSMNet only; train this " \
      'network with --frameworks jax' in stderr
  status, _, stderr = _parity(*args, '--config.model.num_feature=4')
  assert status == 2 and '--config.model.num_feature: no such config key' in stderr
  status, _, stderr = _parity(*args, '--config.train.learning_rate=1e-3')
  assert status == 2 and stderr.count('\n') == 1
  assert f'{out} holds runs of other settings (config.train.learning_rate 0.001 here, ' \
         '0.002 there); pass another --out' in stderr

  # A run that fails: the third seed's initial weights are damaged.
  damaged = out / 'initial' / 'seed2.safetensors'
  damaged.write_bytes(b'not a safetensors file')
  status, stdout, stderr = _parity(*args[:-4], '--seeds', '3', '--out', str(out))
  assert status == 1 and stderr.count('\n') == 1, stderr
  assert 'run jax-seed2 failed (exit 2): ' in stderr and 'seed2.safetensors' in stderr
  assert str(out / 'runs' / 'jax-seed2.log') in stderr
  assert stdout.count('finished earlier, kept') == 6
  assert (out / 'parity.json').read_bytes() == settings
  assert {p: p.read_bytes() for p in sorted((out / 'runs').glob('*/run.json'))} == finished
  damaged.unlink()


def test_forward_checks_the_weights_of_a_checkpoint(tmp_path):
  tiny = TorchFSMNet(num_features=8, num_res_blocks=1, num_heads=2)
  source = tmp_path / 'tiny.pth'
  torch.save(tiny.state_dict(), source)
  status, stdout, _ = _parity('forward', str(source), '--size', '32')
  assert status == 0
  assert 'FSMNet(num_features=8, num_res_blocks=1, num_heads=2' in stdout.splitlines()[0]
  assert 'PASS: float64 max rel < 1e-09' in stdout
  status, _, stderr = _parity('forward', str(tmp_path / 'nope.pth'))
  assert status == 2 and 'nope.pth: no such file' in stderr



def test_verdicts_of_made_up_runs():
  # Paired differences 0.1 and 0.3: mean 0.2, standard deviation 0.1414, t(0.975, 1) 12.706.
  interval = paired_difference({0: 30.1, 1: 30.3, 2: 29.0}, {0: 30.0, 1: 30.0})
  assert interval['seeds'] == 2 and interval['difference'] == pytest.approx(0.2)
  assert interval['high'] - interval['difference'] == pytest.approx(12.706 * 0.1, rel=1e-4)
  assert paired_difference({0: 30.1}, {0: 30.0}) is None
  curves = {'jax': {'loss': [0.0] * 3, 'params': {1: 3e-5, 2: 1e-4, 3: 0.0}},
            'torch-ulp': {'loss': [0.0] * 3, 'params': {1: 1e-5, 2: 0.0, 3: 0.0}},
            'torch-1thread': {'loss': [0.0] * 3, 'params': {1: 2e-5, 2: 0.0, 3: 0.0}}}
  numerics = noise_verdict(curves, float64=False)['same_numerics']
  # Against the larger of the two noise curves; a difference where the reference has none
  # fails; none where it has none is agreement.
  assert numerics['ratios'] == {1: 1.5, 2: float('inf'), 3: 0.0}
  assert numerics['passed'] is False
  curves['jax']['params'][2] = 0.0
  assert noise_verdict(curves, float64=False)['same_numerics']['passed'] is True
  # float64 judges the first steps by the loss, and the later ones against one ulp only.
  curves['jax']['loss'] = [1e-12, 2e-10, 3e-9]
  verdict = noise_verdict(curves, float64=True)
  assert verdict['same_algorithm']['passed'] is False  # 3e-9 > 1e-9
  assert verdict['same_numerics']['passed'] is None  # no step after the third to judge
  assert failed({'same_result': None, 'verdicts': {'0': verdict}}) == [
      'same_algorithm (seed 0)']


def test_table2_rows_are_the_papers_networks():
  config = tiny.get_config()
  networks = {row: table2_config(config, row) for row in TABLE2_ROWS}
  assert networks['mdunet'].model_name == 'mdunet'
  assert networks['mdunet'].model.num_features == config.model.num_features // 2
  switches = {row: (c.model_name, c.model.use_frequency_branch, c.model.use_cms_fusion,
                    c.model.use_fs_fusion) for row, c in networks.items() if row != 'mdunet'}
  assert switches == {'fsfe': ('fsmnet', True, False, False), 'cms': ('fsmnet', True, True, False),
                      'fsmnet': ('fsmnet', True, True, True)}
  assert config.model_name == 'fsmnet' and config.model.use_fs_fusion  # not changed


def test_ablation_writes_table2_beside_the_papers(tmp_path, data_root, compile_cache):
  out = tmp_path / 'table2'
  with mock.patch.dict('os.environ', compile_cache_env(compile_cache)):
    status, stdout, stderr = _parity(
        'ablation', '--config', str(REPO / 'configs/tiny.py'), f'--config.data.root={data_root}',
        '--config.eval.max_batches=1', '--config.eval.batch_size=4', '--config.eval.every=2',
        '--rows', 'mdunet', '--seeds', '2', '--steps', '2', '--out', str(out))
  assert status == 0, stderr
  assert (out / 'table2.png').stat().st_size > 10_000  # the PSNR curve was drawn
  (row,) = json.loads((out / 'table2.json').read_text())['rows']
  model = MDUNet(num_features=tiny.get_config().model.num_features // 2)
  assert row['row'] == 'mdunet' and row['framework'] == 'jax' and row['paper'] == [37.94, 0.975]
  assert row['eval_psnr']['seeds'] == 2
  assert row['parameters'] == count_params(abstract_params(model))
  assert '| multi-modal U-Net, concat fusion (MDUNet) | jax |' in stdout
  # No twin, no reference initialisation: each seed starts where fsmnet-train would.
  assert not (out / 'mdunet' / 'initial').exists()
  config = table2_config(tiny.get_config(), 'mdunet')
  for seed in (0, 1):
    config.seed = seed
    expected = train.create_train_state(config, model, train.make_mesh(config)).params
    np.testing.assert_array_equal(_snapshots(out / 'mdunet', f'jax-seed{seed}')['step_0'],
                                  flatten(expected))
  status, _, stderr = _parity('ablation', '--config', str(REPO / 'configs/tiny.py'),
                              '--rows', 'mdunet,resnet', '--out', str(out))
  assert status == 2 and '--rows mdunet,resnet: use some of mdunet, fsfe, cms, fsmnet' in stderr


def test_runs_recorded_before_a_config_key_existed_still_count(tmp_path):
  """Such runs ran as the key's default does: a folder of them is claimed, unless the key is
  now set otherwise."""
  config = tiny.get_config()
  as_recorded = parity_cli._as_recorded  # pylint: disable=protected-access
  settings = {'config': as_recorded(config.to_dict()), 'steps': 3, 'dtype': 'float32'}
  older = as_recorded(settings)
  del older['config']['data']['repetition'], older['config']['model_name']
  (tmp_path / 'parity.json').write_text(json.dumps(older))
  claim = parity_cli._claim  # pylint: disable=protected-access
  claim(tmp_path, settings)
  # What each run's worker process reads: the recorded config, completed.
  recorded = parity_cli._recorded_settings(tmp_path)  # pylint: disable=protected-access
  assert recorded['config'] == settings['config']
  config.data.repetition = 2
  with pytest.raises(ValueError, match=r'holds runs of other settings \(config.data.repetition '
                                       r'2 here, 0 there\)'):
    claim(tmp_path, {**settings, 'config': as_recorded(config.to_dict())})
