"""fsmnet-eval: Table 1, per-slice CSV, pictures; agreement with training's evaluation; two
processes writing the report of one."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from matplotlib import image as mpimg

from fsmnet_jax.configs import tiny
from fsmnet_jax import checkpoint, evaluate, train
from fsmnet_jax.model import FSMNet, init_variables
from training_runs import SPATIAL_BRANCH, SPATIAL_ONLY, cli_env, free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def config(data_root):
  config = tiny.get_config()
  config.data.root = str(data_root)
  config.eval.batch_size = 4
  return config


@pytest.fixture(scope='module')
def params(config):
  return init_variables(FSMNet(**config.model), jax.random.key(0))['params']


@pytest.fixture(scope='module')
def evaluation(tmp_path_factory, config, params):
  out = tmp_path_factory.mktemp('eval') / 'eval_test'
  report = evaluate.evaluate(config, params, FSMNet(**config.model), out,
                             with_data_consistency=True, num_panels=2)
  return out, report


def _rows(path: Path) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_table1_markdown():
  summary = {'zero_filled': {'psnr': {'mean': 30.04, 'std': 1.51},
                             'ssim': {'mean': 0.74812, 'std': 0.03401},
                             'nmse': {'mean': 0.0412, 'std': 0.0051}},
             'fsmnet': {'psnr': {'mean': 41.756, 'std': 1.884},
                        'ssim': {'mean': 0.98612, 'std': 0.00444},
                        'nmse': {'mean': 0.00153, 'std': 0.00031}}}
  assert evaluate.table1_markdown(summary, 4, '### BraTS') == (
      '### BraTS\n\n'
      '| Method | PSNR (4x) | SSIM (4x) | NMSE (4x) |\n'
      '|---|---|---|---|\n'
      '| Zero-filling | 30.04 ± 1.51 | 0.7481 ± 0.0340 | 0.0412 ± 0.0051 |\n'
      '| FSMNet | 41.76 ± 1.88 | 0.9861 ± 0.0044 | 0.0015 ± 0.0003 |\n')
  mdunet = evaluate.table1_markdown(summary, 4, '### BraTS', network='MDUNet')
  assert mdunet.splitlines()[-1].startswith('| MDUNet | 41.76 ± 1.88 |')


@pytest.mark.parametrize('slices', [5, 37])
def test_evaluating_max_batches_scores_the_same_slices_whatever_the_process_count(slices):
  """The split's first batches, split over the processes (each process's own first batches
  were another subset for each process count)."""
  for processes in (1, 2, 4, 8):
    shares = evaluate.even_shares(slices, processes, global_batch=8, max_batches=2)
    assert [key for share in shares for key in share] == list(range(min(slices, 16)))
    assert max(map(len, shares)) <= 2 * 8 // processes  # in at most max_batches steps
  assert evaluate.even_shares(slices, 2, 8) == [range(0, slices // 2), range(slices // 2, slices)]


def test_report_files_agree_with_each_other(evaluation):
  out, report = evaluation
  assert json.loads((out / 'metrics.json').read_text()) == report
  assert report['network'] == 'FSMNet'
  slices = _rows(out / 'slices.csv')
  assert report['num_slices'] == len(slices) > 0
  assert report['num_subjects'] == len({r['subject'] for r in slices}) == 1  # 1 of 4 is test
  assert list(slices[0]) == ['subject', 'slice'] + [
      f'{m}_{k}' for m in ('zero_filled', 'fsmnet', 'fsmnet_dc') for k in evaluate.METRICS]
  for method, scores in report['reference_convention'].items():
    for metric, stats in scores.items():
      values = [float(r[f'{method}_{metric}']) for r in slices]
      np.testing.assert_allclose(stats['mean'], np.mean(values), rtol=1e-9)
      np.testing.assert_allclose(stats['std'], np.std(values), rtol=1e-9)
  volumes = _rows(out / 'volumes.csv')
  assert len(volumes) == 1 and int(volumes[0]['slices']) == len(slices)
  table = (out / 'table1.md').read_text()
  psnr = report['reference_convention']['fsmnet']['psnr']
  assert f'| FSMNet | {psnr["mean"]:.2f} ± {psnr["std"]:.2f} |' in table
  assert f'1 subjects, {len(slices)} slices' in table


def test_pictures_are_not_blank(evaluation):
  out, _ = evaluation
  panels = sorted((out / 'panels').glob('*.png'))
  assert len(panels) == 2
  for path in [*panels, out / 'psnr_per_slice.png']:
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 0.1  # not a blank canvas
    # Many distinct colours: images, and the coloured error map / curves, were drawn.
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 100
  panel = mpimg.imread(panels[0])[..., :3]
  saturation = panel.max(axis=-1) - panel.min(axis=-1)
  assert (saturation > 0.3).mean() > 0.01  # the error map and its colour bar


def test_agrees_with_the_training_evaluator(config, params, evaluation):
  _, report = evaluation
  during_training = evaluate.SplitEvaluator(config, train.make_mesh(config),
                                            FSMNet(**config.model).apply)(params)
  for method, prefix in (('fsmnet', 'eval_'), ('zero_filled', 'eval_zero_filled_')):
    for metric in evaluate.METRICS:
      np.testing.assert_allclose(report['reference_convention'][method][metric]['mean'],
                                 during_training[prefix + metric], rtol=1e-5)


def test_refuses_an_existing_output(config, params, evaluation):
  out, _ = evaluation
  before = {p: p.stat().st_mtime_ns for p in out.rglob('*')}
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    evaluate.evaluate(config, params, FSMNet(**config.model), out)
  assert {p: p.stat().st_mtime_ns for p in out.rglob('*')} == before
  a_file = out.parent / 'a_file'
  a_file.write_text('the user\'s')
  with pytest.raises(FileExistsError, match='is a file, and this output is a folder'):
    evaluate.evaluate(config, params, FSMNet(**config.model), a_file, overwrite=True)
  assert a_file.read_text() == 'the user\'s'


# fsmnet-eval (argv: a file to create, then its flags) whose last figure waits for a signal.
HOLD_THE_LAST_FIGURE = """
import sys, time
from pathlib import Path
from fsmnet_jax import evaluate
from fsmnet_jax.cli import eval as eval_cli
started = Path(sys.argv.pop(1))
evaluate.plot_psnr_by_position = lambda *args: (started.touch(), time.sleep(600))
eval_cli.run()
"""


def test_cli_converts_a_pytorch_checkpoint_on_the_fly(tmp_path, config, params, evaluation):
  torch = pytest.importorskip('torch')
  from torch_port.convert import flax_to_torch  # pylint: disable=import-outside-toplevel
  torch.save({'network': flax_to_torch({'params': params})}, tmp_path / 'model.pth')
  command = [sys.executable, '-m', 'fsmnet_jax.cli.eval', '--config',
             str(REPO / 'configs/tiny.py'), f'--config.data.root={config.data.root}',
             '--config.eval.batch_size=4', '--checkpoint', str(tmp_path / 'model.pth'),
             '--num_panels=1']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'CI': 'true'}
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / 'model_eval_test'
  assert '| FSMNet |' in result.stdout and (out / 'panels').is_dir()
  cli_report = json.loads((out / 'metrics.json').read_text())
  # Same weights (the conversion is exact), same slices: the same numbers.
  for method in ('zero_filled', 'fsmnet'):
    for metric in evaluate.METRICS:
      np.testing.assert_allclose(cli_report['reference_convention'][method][metric]['mean'],
                                 evaluation[1]['reference_convention'][method][metric]['mean'],
                                 rtol=1e-6)
  # In bfloat16, into a folder of its own: what the target asks of a trained model,
  # the mean PSNR within 0.1 dB of float32, holds for these untrained weights too (the output
  # moves by ~1e-3 relative, measured on AMD Zen 5), and the numbers are bf16's own.
  in_bf16 = subprocess.run([*command, '--precision=bf16'], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
  assert in_bf16.returncode == 0, in_bf16.stderr[-3000:]
  assert 'mask, the network in bf16:' in in_bf16.stdout
  bf16_report = json.loads((tmp_path / 'model_eval_test_bf16' / 'metrics.json').read_text())
  assert (bf16_report['precision'], cli_report['precision']) == ('bf16', 'fp32')
  psnr = [r['reference_convention']['fsmnet']['psnr']['mean'] for r in (cli_report, bf16_report)]
  assert psnr[0] != psnr[1] and abs(psnr[0] - psnr[1]) < 0.1, psnr
  again = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
  assert again.returncode == 2 and 'already exists' in again.stderr
  assert 'Traceback' not in again.stderr

  # SIGTERM while the replacement is being written: the old report stays whole. The write is
  # held open at its last figure until the signal (polling for the partial folder alone raced
  # with a write that took milliseconds).
  before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
  writing = tmp_path / 'writing'
  held = [sys.executable, '-c', HOLD_THE_LAST_FIGURE, str(writing), *command[3:], '--overwrite']
  process = subprocess.Popen(held, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=tmp_path)
  deadline = time.monotonic() + 300
  while not writing.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
  assert list(tmp_path.glob('.partial-*'))
  writing.unlink()
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == (
      'fsmnet-eval: stopped by SIGTERM; outputs not finished were removed')
  assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pth', 'model_eval_test',
                                                         'model_eval_test_bf16']


def _two_processes(command: list[str], compile_cache: Path, logs: Path
                   ) -> list[tuple[int, str]]:
  """(exit status, stderr) of `command` run as processes 0 and 1 of one run, 2 devices each
  (stderr into files in `logs`: a full pipe would stall a process, and the other with it)."""
  port = free_port()
  logs.mkdir()
  processes = []
  try:  # (a process that fails leaves the other waiting in a collective)
    for i in range(2):
      with open(logs / f'{i}.txt', 'w') as stderr:
        processes.append(subprocess.Popen(
            [*command, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}'], env=cli_env(2, compile_cache), stdout=subprocess.DEVNULL,
            stderr=stderr))
    statuses = [p.wait(timeout=600) for p in processes]
  finally:
    for process in processes:
      process.kill()
  return [(status, (logs / f'{i}.txt').read_text()) for i, status in enumerate(statuses)]


def test_two_processes_write_the_report_of_one(tmp_path, data_root, compile_cache):
  """Each process scores its share of whole volumes; process 0 writes what one process
  would. (The spatial branch: the sharing is the same for any network.)"""
  model = FSMNet(**{**tiny.get_config().model, **SPATIAL_BRANCH})
  checkpoint.save_variables(init_variables(model, jax.random.key(1)), tmp_path / 'variables')
  # Two test subjects of four (six of each one's eight slices hold anatomy): one per process.
  command = [sys.executable, '-m', 'fsmnet_jax.cli.eval', '--config',
             str(REPO / 'configs/tiny.py'), f'--config.data.root={data_root}',
             '--config.data.test_fraction=0.5', '--config.eval.batch_size=4', *SPATIAL_ONLY,
             '--checkpoint', str(tmp_path / 'variables'), '--num_panels=3']
  one = subprocess.run([*command, f'--out={tmp_path / "one"}'], capture_output=True, text=True,
                       env=cli_env(4, compile_cache), timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  outputs = _two_processes([*command, f'--out={tmp_path / "two"}'], compile_cache,
                           tmp_path / 'logs')
  for status, stderr in outputs:
    assert status == 0, outputs[0][1][-3000:] + outputs[1][1][-3000:]
  assert 'process 1 of 2; 2 local and 4 global devices' in outputs[1][1]
  one_dir, two_dir = tmp_path / 'one', tmp_path / 'two'
  assert sorted(p.relative_to(two_dir) for p in two_dir.rglob('*')) == sorted(
      p.relative_to(one_dir) for p in one_dir.rglob('*'))
  reports = [json.loads((folder / 'metrics.json').read_text()) for folder in (one_dir, two_dir)]
  assert (reports[0]['num_subjects'], reports[0]['num_slices']) == (2, 12)
  for name in ('table1.md', 'slices.csv'):
    assert (two_dir / name).read_text() == (one_dir / name).read_text(), name
  # The report exists: process 0 refuses, and the other stops with it rather than wait.
  again = _two_processes([*command, f'--out={two_dir}'], compile_cache, tmp_path / 'again')
  for status, stderr in again:
    assert status == 2 and stderr.strip().splitlines()[-1] == (
        f'fsmnet-eval: error: {two_dir}: already exists; pass --overwrite to replace it'), stderr
  # Per volume (from the images, in float64): XLA:CPU's convolutions split their sums by the
  # threads of a process, so the images of 2 devices in each of two processes and of 4 in one
  # differ by float32 ulps (measured: volume PSNR and NMSE within 2e-9 relative, their std over
  # volumes 4.2e-8). The per-slice metrics (uint8, in the step) are equal.
  flat = lambda tree, path='': ({path: tree} if not isinstance(tree, dict) else
                                {k: v for key, value in tree.items()
                                 for k, v in flat(value, f'{path}/{key}').items()})
  one_values, two_values = flat(reports[0]), flat(reports[1])
  assert one_values.keys() == two_values.keys()
  for key, value in one_values.items():
    assert two_values[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                               else value), key
  volumes = [_rows(folder / 'volumes.csv') for folder in (one_dir, two_dir)]
  assert [row['subject'] for row in volumes[0]] == [row['subject'] for row in volumes[1]]
  for row, other in zip(*volumes):
    assert {k: float(v) for k, v in other.items() if k != 'subject'} == pytest.approx(
        {k: float(v) for k, v in row.items() if k != 'subject'}, rel=1e-6)
