"""fsmnet-bench: the plan, the worker processes and the report, on the tiny model (--quick)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsmnet_jax import bench


def test_default_plan_measures_what_the_readme_table_shows():
  specs = bench.plan()
  rows = {(s.framework, s.task, s.model, s.size, s.batch) for s in specs}
  for framework in ('jax', 'torch', 'torch-tuned'):
    assert {(framework, 'train', 'paper', 240, 4), (framework, 'train', 'tiny', 64, 4),
            (framework, 'infer', 'paper', 240, 1), (framework, 'infer', 'paper', 240, 8)} <= rows
  # inductor compiles the tiny model only; the paper model would take most of the budget.
  assert {s.model for s in specs if s.framework == 'torch-compile'} == {'tiny'}
  assert {(s.framework, s.task) for s in specs if s.task in ('matmul', 'flops')} == {
      ('jax', 'matmul'), ('torch-tuned', 'matmul'), ('torch-tuned', 'flops')}
  assert all(s.group == 'main' for s in specs)
  assert {s.repeats for s in specs if s.model == 'paper' and s.batch > 1} == {2}
  # JAX trains the paper model one image at a time (CPU), or whole (--whole-batch, GPUs).
  assert {(s.framework, s.micro_batches) for s in specs if s.task == 'train'
          and s.model == 'paper'} == {('jax', 4), ('torch', 1), ('torch-tuned', 1)}
  assert {s.micro_batches for s in bench.plan(micro_batched=False)} == {1}


def test_sweeps_cover_sizes_batches_and_devices():
  specs = bench.plan(frameworks=('jax', 'torch-tuned'), sweeps=('size', 'batch', 'devices'))
  by_group = lambda g: [s for s in specs if s.group == g]
  assert {s.size for s in by_group('size')} == {128, 240, 320, 480}
  assert {s.batch for s in by_group('batch')} == {1, 2, 4, 8, 16}
  assert {s.devices for s in by_group('devices')} == {1, 2, 4, 8}
  assert {s.framework for s in by_group('devices')} == {'jax'}
  with pytest.raises(ValueError, match='unknown sweep'):
    bench.plan(sweeps=('threads',))


def test_quick_run_measures_both_frameworks_in_their_own_processes(tmp_path, capsys):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  code = bench.main(['--quick', '--frameworks', 'jax,torch', '--repeats', '2', '--threads', '1',
                     '--json', str(out)])
  report = capsys.readouterr().out
  assert code == 0, report
  data = json.loads(out.read_text())
  assert data['machine']['threads'] == 1 and data['machine']['jax'] and data['machine']['torch']
  measured = [r for r in data['results'] if r['spec']['task'] in ('train', 'infer')]
  assert len(measured) == 2 * 3
  for entry in measured:
    result = entry['result']
    assert 'error' not in result, entry
    assert len(result['seconds']) == 2 and result['min_s'] <= result['median_s'] <= result['max_s']
    assert result['images_per_s'] == pytest.approx(entry['spec']['batch'] / result['median_s'])
    assert result['threads'] == 1 and result['peak_rss_gib'] > 0.1
    if entry['spec']['framework'] == 'jax':
      assert result['compile_s'] > 0 and result['flops_per_image'] > 0
      assert result['device_count'] == 1
  summary = data['summary']
  assert summary['matmul_peak_gflops_per_s'] > 1
  assert set(summary['ratios']) == {f'{row}: JAX / torch' for row in (
      'train tiny 16px batch 2', 'infer tiny 16px batch 1', 'infer tiny 16px batch 2')}
  # Both FLOP counts of the forward pass: XLA's cost analysis also counts the element-wise
  # work, the FFTs and the attention, torch's FlopCounterMode only matmuls and convolutions.
  torch_forward = summary['torch_flops_per_image']['flops_per_image']
  jax_forward = summary['utilisation']['infer tiny 16px batch 1']['gflop_per_image'] * 1e9
  assert torch_forward <= jax_forward <= 3 * torch_forward
  # A training step is about three forward passes, micro-batched (a scan) or not.
  jax_train = summary['utilisation']['train tiny 16px batch 2']['gflop_per_image'] * 1e9
  assert 2 * jax_forward <= jax_train <= 4 * jax_forward
  assert '| train step, tiny 16px, batch 2 |' in report and 'JAX / PyTorch eager |' in report


def test_failed_worker_is_reported_not_hidden(tmp_path):
  result = bench.run_worker(bench.Spec('jax', 'train', 'tiny', size=30, batch=4),
                            tmp_path / 'missing.npz', [0])
  assert 'error' in result and 'exit code' in result['error']
  report = bench.format_report(
      [{'spec': bench.dataclasses.asdict(bench.Spec('jax', 'train', 'tiny', 32, 4)),
        'result': result}], bench.summarize([]), bench.machine_info([0]))
  assert 'failed' in report and 'Failed measurements:\n- jax (train tiny 32px): exit code' in report


def test_bf16_rows_are_jax_mixed_precision_of_the_batched_headline_rows():
  specs = bench.plan(frameworks=('jax', 'torch'), bf16=True)
  assert {(s.framework, s.task, s.model, s.size, s.batch) for s in specs
          if s.dtype == 'bfloat16'} == {('jax', 'train', 'paper', 240, 4),
                                         ('jax', 'infer', 'paper', 240, 8)}
  assert not any(s.dtype == 'bfloat16' for s in bench.plan(frameworks=('jax',)))


def test_bfloat16_inference_worker(tmp_path):
  weights = tmp_path / 'tiny.npz'
  bench._save_weights('tiny', weights)
  spec = bench.Spec('jax', 'infer', 'tiny', 16, 2, dtype='bfloat16', repeats=2)
  result = bench.run_worker(spec, weights, [0])
  assert 'error' not in result, result
  assert len(result['seconds']) == 2 and result['flops_per_image'] > 0
  results = [{'spec': bench.dataclasses.asdict(spec), 'result': result}]
  report = bench.format_report(results, bench.summarize(results), bench.machine_info([0]))
  assert '| inference, tiny 16px, batch 2, bfloat16 |' in report


def test_report_on_a_gpu_names_it_and_shows_device_memory():
  def entry(framework, seconds, device_gib, device='NVIDIA H200'):
    result = {'seconds': [seconds] * 3, 'median_s': seconds, 'min_s': seconds, 'max_s': seconds,
              'images_per_s': 4 / seconds, 'peak_rss_gib': 3.0, 'peak_device_gib': device_gib,
              'device': device}
    return {'spec': bench.dataclasses.asdict(bench.Spec(framework, 'train', batch=4)),
            'result': result}
  results = [entry('jax', 0.08, 10.5), entry('torch', 0.18, 12.25)]
  report = bench.format_report(results, bench.summarize(results), bench.machine_info([0]))
  assert 'NVIDIA H200 (TF32 float32 arithmetic)' in report
  assert '| train step, paper 240px, batch 4 | 10.50 | 12.25 |' in report
  assert '| train step, paper 240px, batch 4 | 50 (50–50) | 22.2 (22.2–22.2) | 2.25x |' in report


def test_sigterm_reports_and_keeps_the_finished_measurements(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  # --repeats 7 marks this run's workers, to check that none outlives the interrupted run.
  process = subprocess.Popen(
      [sys.executable, '-m', 'fsmnet_jax.bench', '--quick', '--frameworks', 'torch',
       '--repeats', '7', '--threads', '1', '--json', str(out)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while not (out.exists() and json.loads(out.read_text())['results']):
    assert process.poll() is None and time.monotonic() < deadline, process.communicate()
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  report, log = process.communicate(timeout=60)
  assert process.returncode == 1, log
  data = json.loads(out.read_text())
  assert data['machine']['interrupted'] and 'interrupted after' in log
  finished = data['results']
  assert finished and all('error' not in r['result'] for r in finished)
  assert '| train step, tiny 16px, batch 2 |' in report and 'interrupted)' in report
  workers = [p for p in Path('/proc').glob('[0-9]*/cmdline')
             if b'--worker' in _read(p) and b'"repeats": 7' in _read(p)]
  assert not workers


def _read(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError:  # the process ended meanwhile
    return b''
