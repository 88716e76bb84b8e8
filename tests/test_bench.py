"""fsmnet-bench: the plan, the summary and the report on synthetic results, the command line
with stand-in workers, and one real run of the smallest plan: both frameworks' workers, each
in a process of its own, interrupted by SIGTERM in its last measurement."""

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fsmnet_bench
from fsmnet_bench import launch, plan, profile, report
from fsmnet_bench.plan import Spec
from fsmnet_jax.configs import tiny
from training_runs import UNOPTIMIZED_FLAGS, compile_cache_env

INFO = {'date': '2025-01-02', 'python': '3.12.1', 'platform': 'Linux', 'cpus_used': [0, 1],
        'threads': 2, 'cpu_model': 'Test CPU', 'jax': '0.10.2', 'jaxlib': '0.10.2',
        'flax': '0.12.8', 'torch': '2.13.0'}


def _timing(spec: Spec, seconds: list[float], **fields) -> dict:
  """A train or infer result as launch.run_worker returns it."""
  median = statistics.median(seconds)
  return {'seconds': seconds, 'median_s': median, 'min_s': min(seconds), 'max_s': max(seconds),
          'images_per_s': spec.batch / median, 'peak_rss_gib': 1.5, 'threads': 2, 'wall_s': 9.0,
          **fields}


def _entry(spec: Spec, result: dict) -> dict:
  """One measurement as the JSON report lists it."""
  return {'spec': dataclasses.asdict(spec), 'result': result}


def test_default_plan_measures_what_the_readme_table_shows():
  specs = plan.plan()
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
  assert {s.micro_batches for s in plan.plan(micro_batched=False)} == {1}
  # XLA's own convolutions (the CPU paths off) on request, on whole batches: in a loop their
  # gradients run on a naive kernel.
  assert 'jax-xla-conv' not in {s.framework for s in specs}
  assert {(s.task, s.model, s.micro_batches) for s in plan.plan(frameworks=('jax-xla-conv',))
          if s.framework == 'jax-xla-conv'} == {('train', 'paper', 1), ('train', 'tiny', 1),
                                                ('infer', 'paper', 1)}


def test_quick_plan_is_the_tiny_model_at_16_px():
  specs = plan.plan(quick=True, frameworks=('jax', 'torch'), repeats=2)
  assert [(s.framework, s.task, s.model, s.size, s.batch, s.micro_batches, s.repeats)
          for s in specs] == [
              ('jax', 'train', 'tiny', 16, 2, 2, 2), ('jax', 'infer', 'tiny', 16, 1, 1, 2),
              ('jax', 'infer', 'tiny', 16, 2, 1, 2), ('torch', 'train', 'tiny', 16, 2, 1, 2),
              ('torch', 'infer', 'tiny', 16, 1, 1, 2), ('torch', 'infer', 'tiny', 16, 2, 1, 2),
              ('jax', 'matmul', 'paper', 240, 1, 1, 3),
              ('torch-tuned', 'matmul', 'paper', 240, 1, 1, 3),
              ('torch-tuned', 'flops', 'tiny', 16, 1, 1, 3)]
  assert specs[0].label == 'train tiny 16px batch 2, 2 micro-batches [jax]'


def test_models_are_the_configs_models():
  assert plan.MODELS['tiny'] == tiny.get_config().model.to_dict()
  assert plan.MODELS['paper']['num_features'] == 64


def test_sweeps_cover_sizes_batches_and_devices():
  specs = plan.plan(frameworks=('jax', 'torch-tuned'), sweeps=('size', 'batch', 'devices'))
  by_group = lambda g: [s for s in specs if s.group == g]
  assert {s.size for s in by_group('size')} == {128, 240, 320, 480}
  assert {s.batch for s in by_group('batch')} == {1, 2, 4, 8, 16}
  assert {s.devices for s in by_group('devices')} == {1, 2, 4, 8}
  assert {s.framework for s in by_group('devices')} == {'jax'}
  assert by_group('devices')[1].label == 'train paper 128px batch 8, 2 devices [jax]'
  with pytest.raises(ValueError, match='unknown sweep'):
    plan.plan(sweeps=('threads',))


def test_bf16_rows_are_mixed_precision_of_the_headline_model_in_both_frameworks():
  specs = plan.plan(frameworks=('jax', 'torch', 'torch-compile'), bf16=True)
  assert {(s.framework, s.task, s.model, s.size, s.batch) for s in specs
          if s.dtype == 'bfloat16'} == {(framework, task, 'paper', 240, batch)
                                         for framework in ('jax', 'torch')
                                         for task, batch in (('train', 4), ('infer', 1),
                                                             ('infer', 8))}
  assert not any(s.dtype == 'bfloat16' for s in plan.plan(frameworks=('jax',)))


def test_summary_and_report_of_a_cpu_run():
  train = {f: Spec(f, 'train', batch=4, micro_batches=4 if f == 'jax' else 1)
           for f in ('jax', 'torch', 'torch-compile')}
  results = [
      _entry(train['jax'], _timing(train['jax'], [2.0, 1.0, 4.0], compile_s=12.34,
                                   device_count=1, flops_per_image=50e9)),
      _entry(train['torch'], _timing(train['torch'], [4.0, 4.0, 4.0])),
      _entry(train['torch-compile'], {'error': 'exit code 1: InductorError: no compiler'}),
      _entry(Spec('jax', 'matmul'), {'seconds': [1.0], 'matmul_size': 2048,
                                     'gflops_per_s': 80.0}),
      _entry(Spec('torch-tuned', 'matmul'), {'seconds': [1.0], 'matmul_size': 2048,
                                             'gflops_per_s': 100.0}),
      _entry(Spec('torch-tuned', 'flops'), {'flops_per_image': 10e9,
                                            'train_flops_per_image': 30e9}),
      _entry(Spec('jax', 'infer', size=128, repeats=2, group='size'),
             _timing(Spec('jax', 'infer'), [0.5, 0.25])),
      _entry(Spec('torch-tuned', 'infer', size=240, repeats=2, group='size'),
             {'error': 'exit code -9: killed'}),
  ]
  summary = report.summarize(results)
  assert summary['ratios'] == {'train paper 240px batch 4: JAX / torch': pytest.approx(2.0)}
  assert summary['matmul_peak_gflops_per_s'] == 100.0 and summary['matmul_size'] == 2048
  assert summary['torch_flops_per_image'] == {'flops_per_image': 10e9,
                                              'train_flops_per_image': 30e9}
  assert summary['utilisation'] == {'train paper 240px batch 4': pytest.approx(
      {'gflop_per_image': 50.0, 'achieved_gflops_per_s': 100.0, 'mfu': 1.0})}
  assert report.format_report(results, summary, INFO) == '\n'.join([
      'fsmnet-bench, 2025-01-02: Test CPU, 2 threads (CPUs [0, 1]); jax 0.10.2, flax 0.12.8, '
      'torch 2.13.0, Python 3.12.1.',
      '',
      '| images/s, median (range) | JAX (jit) | PyTorch eager | torch.compile, tuned | '
      'JAX / PyTorch eager | JAX / torch.compile, tuned |',
      '|---|---|---|---|---|---|',
      '| train step, paper 240px, batch 4 | 2 (1–4) | 1 (1–1) | failed | 2.00x | – |',
      '',
      '| peak host RSS, GiB | JAX (jit) | PyTorch eager | torch.compile, tuned |',
      '|---|---|---|---|',
      '| train step, paper 240px, batch 4 | 1.50 | 1.50 | – |',
      '',
      '| compile / first call, s | JAX (jit) | PyTorch eager | torch.compile, tuned |',
      '|---|---|---|---|',
      '| train step, paper 240px, batch 4 | 12.3 | – | – |',
      '',
      'JAX trains batch 4 as 4 micro-batches (config.train.grad_accum_steps=4): the same '
      'gradient, accumulated.',
      '',
      'Matmul peak (2048x2048 float32, best of both frameworks): 100 GFLOP/s.',
      "torch FlopCounterMode at the first row's model and size: forward 10.0 GFLOP/image, "
      'training step 30.0 GFLOP/image.',
      '',
      '| JAX (XLA cost analysis) | GFLOP/image | achieved GFLOP/s | MFU |',
      '|---|---|---|---|',
      '| train paper 240px batch 4 | 50.0 | 100 | 100% |',
      '',
      'Failed measurements:',
      '- torch-compile (train paper 240px): exit code 1: InductorError: no compiler',
      '- torch-tuned (infer paper 240px): exit code -9: killed',
      '',
      '| image size | task | framework | s per call, median (range) | images/s | peak RSS GiB |',
      '|---|---|---|---|---|---|',
      '| 128 | infer paper 128px b1 | JAX (jit) | 0.375 (0.25–0.5) | 2.67 | 1.50 |',
      '| 240 | infer | torch-tuned | failed: exit code -9: killed | – | – |'])


def test_report_of_sweeps_only_without_a_matmul():
  spec = Spec('jax', 'train', 'paper', 128, 8, devices=2, group='devices')
  results = [_entry(spec, _timing(spec, [4.0], flops_per_image=1e9))]
  summary = report.summarize(results)
  assert summary == {'matmul_peak_gflops_per_s': None, 'matmul_size': None, 'ratios': {},
                     'utilisation': {}}
  assert report.format_report(results, summary, INFO).split('\n')[1:] == [
      '', '', '| forced host devices | task | framework | s per call, median (range) | images/s | '
          'peak RSS GiB |', '|---|---|---|---|---|---|',
      '| 2 | train paper 128px b8 | JAX (jit) | 4 (4–4) | 2 | 1.50 |']
  # A JAX row of the headline table without a measured peak: no MFU. bfloat16 against float32
  # and against PyTorch's autocast.
  spec = Spec('jax', 'infer', dtype='bfloat16')
  results = [_entry(spec, _timing(spec, [0.5], flops_per_image=2e9)),
             _entry(Spec('jax', 'infer', group='size'), _timing(spec, [4.0])),
             _entry(Spec('torch', 'infer', dtype='bfloat16'), _timing(spec, [1.0]))]
  summary = report.summarize(results)
  assert summary['utilisation'] == {'infer paper 240px batch 1 bfloat16': {
      'gflop_per_image': 2.0, 'achieved_gflops_per_s': 4.0, 'mfu': None}}
  assert summary['ratios'] == {'infer paper 240px batch 1 bfloat16: JAX / torch': 2.0}
  results[1]['spec']['group'] = 'main'
  assert report.summarize(results)['ratios'] == {
      'infer paper 240px batch 1 bfloat16: JAX / torch': 2.0,
      'infer paper 240px batch 1 bfloat16: JAX / JAX float32': 8.0}  # torch float32: absent
  text = report.format_report(results, summary, INFO)
  assert '| inference, paper 240px, batch 1, bfloat16 | 2 (2–2) |' in text
  assert 'Matmul peak: not measured.' in text
  assert '| infer paper 240px batch 1 bfloat16 | 2.0 | 4 | – |' in text


def test_report_on_a_gpu_names_it_and_shows_device_memory():
  def entry(framework, seconds, device_gib, device='NVIDIA H200'):
    spec = Spec(framework, 'train', batch=4)
    return _entry(spec, _timing(spec, [seconds] * 3, peak_rss_gib=3.0,
                                peak_device_gib=device_gib, device=device))
  results = [entry('jax', 0.08, 10.5), entry('torch', 0.18, 12.25)]
  text = report.format_report(results, report.summarize(results), INFO)
  assert 'NVIDIA H200 (TF32 float32 arithmetic)' in text
  assert '| train step, paper 240px, batch 4 | 10.50 | 12.25 |' in text
  assert '| train step, paper 240px, batch 4 | 50 (50–50) | 22.2 (22.2–22.2) | 2.25x |' in text


def test_workers_keep_the_callers_xla_flags_with_their_own_device_count():
  assert launch.xla_flags('', 1) == ''
  assert launch.xla_flags('--xla_cpu_use_onednn=true', 1) == '--xla_cpu_use_onednn=true'
  assert launch.xla_flags('--xla_force_host_platform_device_count=8 --xla_cpu_use_onednn=true',
                          2) == ('--xla_cpu_use_onednn=true '
                                 '--xla_force_host_platform_device_count=2')


def test_machine_info_names_the_cpu_and_versions_without_importing_them():
  info = report.machine_info([0])
  assert info['threads'] == 1 and info['cpus_used'] == [0] and info['cpu_model']
  assert info['jax'] and info['flax'] and set(info) >= {'date', 'python', 'platform', 'jaxlib',
                                                        'torch'}


def test_profile_shares_overlapping_ops_wall_clock_time():
  # ns: a alone 0-5, a and b 5-10, b alone 10-15, nothing 15-20, a again 20-30.
  seconds = profile.wall_shares([(0, 10, 'a'), (5, 15, 'b'), (20, 30, 'a')])
  assert seconds == pytest.approx({'a': 17.5e-9, 'b': 7.5e-9})
  assert profile.classify_aten('aten::convolution_backward',
                               [[1, 64, 8, 8], [1, 64, 8, 8], [64, 1, 3, 3]]) == (
                                   'depthwise convolution')
  assert profile.classify_aten('aten::mkldnn_convolution',
                               [[1, 64, 8, 8], [64, 64, 1, 1], [64]]) == 'convolution'
  assert profile.classify_aten('aten::mkldnn_convolution',  # one input channel: not depthwise
                               [[1, 1, 8, 8], [64, 1, 3, 3], [64]]) == 'convolution'
  assert profile.classify_aten('aten::add', [[1, 64, 8, 8], [1, 64, 8, 8]]) == (
      'element-wise, reductions')
  assert profile.classify_xla({'fusion', 'convolution'}, 'jit(step)/transpose(jvp(x))') == (
      'convolution, input gradient')
  assert profile.classify_xla({'transpose', 'copy'}, 'jit(apply)/x') == (
      'layout: transpose, copy, pad, concatenate')


def test_profile_tells_xlas_depthwise_convolutions_from_dense_ones():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fsmnet_jax import conv  # pylint: disable=import-outside-toplevel
  x, dense, depthwise = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((3, 3, 1, 4))
  loss = lambda dense, depthwise: jnp.sum(
      conv.conv2d(conv.conv2d(x, dense), depthwise, feature_group_count=4)**2)
  gradients = jax.jit(conv.specialized_for(conv.XLA_NATIVE, jax.grad(loss, argnums=(0, 1))))
  instructions = profile._xla_instructions(gradients.lower(dense, depthwise).compile().as_text())
  classes = [name for name, _ in instructions.values()]
  # The dense convolution; the depthwise one, its input gradient and the select and sum of its
  # kernel gradient (in named scopes); the two kernel gradients as convolutions, their
  # metadata lost (XLA:CPU writes the depthwise one as a dense convolution: C times the work).
  assert classes.count('convolution') == 1
  assert classes.count('convolution, kernel gradient') == 2
  assert classes.count('depthwise convolution') >= 4


def test_command_line_runs_the_plan_and_fails_only_for_errors_that_count(tmp_path, monkeypatch,
                                                                          capsys):
  saved, launched, failing = [], [], set()
  monkeypatch.setattr(launch, 'save_weights', lambda model, path: saved.append(model))

  def run_worker(spec, weights, cpus):
    launched.append((spec, weights.name, cpus))
    if spec.framework in failing:
      return {'error': f'exit code 1: {spec.framework} broke'}
    if spec.task == 'matmul':
      return {'seconds': [1.0], 'matmul_size': 2048, 'gflops_per_s': 50.0}
    if spec.task == 'flops':
      return {'flops_per_image': 1e9, 'train_flops_per_image': 3e9}
    return _timing(spec, [0.5] * spec.repeats, threads=len(cpus))
  monkeypatch.setattr(launch, 'run_worker', run_worker)

  out = tmp_path / 'bench.json'
  args = ['--quick', '--frameworks', 'jax,torch-compile', '--repeats', '2', '--threads', '1',
          '--json', str(out)]
  failing.add('torch-compile')  # a finding, not a failure of the benchmark
  assert fsmnet_bench.main(args) == 0
  printed = capsys.readouterr()
  specs = plan.plan(True, ('jax', 'torch-compile'), (), 2)
  assert [spec for spec, _, _ in launched] == specs
  assert {(spec.model, weights) for spec, weights, _ in launched} == {
      ('tiny', 'tiny.msgpack'), ('paper', 'paper.msgpack')}
  first_cpu = min(os.sched_getaffinity(0))
  assert saved == ['tiny'] and {tuple(cpus) for _, _, cpus in launched} == {(first_cpu,)}
  data = json.loads(out.read_text())
  assert data['results'] == [_entry(spec, run_worker(spec, out, [first_cpu])) for spec in specs]
  assert data['machine']['interrupted'] is False and data['machine']['total_s'] >= 0
  assert data['summary'] == report.summarize(data['results'])
  assert printed.out.startswith(report.format_report(data['results'], data['summary'],
                                                     data['machine']))
  assert printed.out.endswith('\n\n(total 0 s)\n')
  assert f'{len(specs)} measurements, 1 threads on CPUs [{first_cpu}]' in printed.err
  assert '  train tiny 16px batch 2, 2 micro-batches [jax]: 0.5 s median (9 s)' in printed.err

  failing.add('jax')
  assert fsmnet_bench.main(args) == 1
  launched.clear()
  failing.clear()
  assert fsmnet_bench.main(['--sweep', 'devices', '--frameworks', 'jax', '--threads', '1']) == 0
  assert {spec.group for spec, _, _ in launched} == {'devices'}
  launched.clear()
  assert fsmnet_bench.main(['--quick', '--sweep', 'size', '--with-main', '--threads', '1']) == 0
  assert {spec.group for spec, _, _ in launched} == {'main', 'size'}
  launched.clear()
  assert fsmnet_bench.main(['--quick', '--tasks', 'infer', '--bf16', '--threads', '1']) == 0
  assert {spec.task for spec, _, _ in launched} == {'infer', 'matmul', 'flops'}


@pytest.mark.parametrize('args, message', [
    (['--frameworks', 'jax,mxnet'], "--frameworks: unknown ['mxnet']"),
    (['--frameworks', ','], '--frameworks: unknown []'),
    (['--repeats', '0'], '--repeats must be at least 1'),
    (['--tasks', 'infer,serve'], "--tasks: 'infer,serve'; choose from train, infer"),
    (['--threads', '100000'], '--threads must be between 1 and the'),
    (['--json', '.'], '--json .: not a file'),
])
def test_command_line_refuses_bad_arguments(args, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    fsmnet_bench.main(args)
  assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_script_in_the_checkout_runs_the_command_line():
  script = Path(__file__).parent.parent / 'scripts' / 'bench.py'
  done = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True,
                        check=True)
  assert done.stdout.startswith('usage: fsmnet-bench [-h] [--json JSON]')
  assert 'FSMNet in JAX against its PyTorch twin' in done.stdout


# Each real measurement of the smallest plan; the last one runs until SIGTERM stops the run.
# The JAX train step is that of test_train.py's runs (tiny, 32 px, batch 8 whole, 1 device):
# the session's compilation cache holds it once those ran (the worker's step then took 26 s
# from the cache against 60 s compiling it, measured idle on a 2-core Zen 3).
SMALLEST = [
    Spec('jax', 'train', 'tiny', 32, 8, repeats=1, profile=True),
    Spec('jax', 'infer', 'tiny', 32, 1, repeats=1),
    Spec('jax', 'infer', 'tiny', 32, 2, dtype='bfloat16', repeats=1),
    Spec('jax-xla-conv', 'infer', 'tiny', 32, 1, repeats=1, profile=True),
    Spec('torch', 'train', 'tiny', 32, 8, repeats=1, profile=True),
    Spec('torch-tuned', 'infer', 'tiny', 32, 2, dtype='bfloat16', repeats=1),  # autocast
    Spec('torch-compile', 'train', 'tiny', 32, 2, micro_batches=2),  # refused by its worker
    Spec('jax', 'matmul', 'tiny'),
    Spec('torch-tuned', 'matmul', 'tiny'),
    Spec('torch-tuned', 'flops', 'tiny', 32, 1),
    Spec('torch', 'infer', 'tiny', 32, 1, repeats=999_999),
]


def _workers_in_flight() -> list[int]:
  """Process ids of this process's running workers of the last SMALLEST spec."""
  marker = json.dumps(dataclasses.asdict(SMALLEST[-1])).encode()
  pids = []
  for process in Path('/proc').glob('[0-9]*'):
    try:
      parent = int((process / 'stat').read_text().rsplit(')', 1)[1].split()[1])
      if parent == os.getpid() and marker in (process / 'cmdline').read_bytes():
        pids.append(int(process.name))
    except OSError:  # the process ended meanwhile
      pass
  return pids


def _sigterm_once_the_last_worker_runs(stop: threading.Event) -> None:
  """Sends this process SIGTERM a second after the last worker started (unless `stop`)."""
  while not stop.wait(0.2):
    if _workers_in_flight():
      time.sleep(1)  # past Popen: subprocess.run kills the worker it waits for
      os.kill(os.getpid(), signal.SIGTERM)
      return


def test_smallest_real_run_of_both_frameworks_until_sigterm(tmp_path, monkeypatch, capsys,
                                                           compile_cache):
  pytest.importorskip('torch')
  monkeypatch.setattr(plan, 'plan', lambda *args, **kwargs: list(SMALLEST))
  # The workers share the session's compilation cache: the weights' initialisation (run op by
  # op, ~300 small programs) was compiled by other tests already. They inherit XLA_FLAGS: LLVM's
  # optimisations off, as in the training tests (the JAX workers compile in 106 instead of 127 s
  # for training, ~60 s less in all on a 2-core Zen 3; no figure checked here depends on it).
  for name, value in {**compile_cache_env(compile_cache), 'XLA_FLAGS': UNOPTIMIZED_FLAGS}.items():
    monkeypatch.setenv(name, value)
  # A SIGTERM after the run (from a watcher too late) must not end the test session.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  stop = threading.Event()
  watcher = threading.Thread(target=_sigterm_once_the_last_worker_runs, args=(stop,))
  watcher.start()
  out = tmp_path / 'bench.json'
  try:
    code = fsmnet_bench.main(['--threads', '1', '--json', str(out)])
  finally:
    stop.set()
    watcher.join()
    signal.signal(signal.SIGTERM, previous)
  printed = capsys.readouterr()
  assert code == 1, printed
  assert not _workers_in_flight()
  assert f'interrupted after {len(SMALLEST) - 1} of {len(SMALLEST)} measurements' in printed.err
  data = json.loads(out.read_text())
  machine, summary, results = data['machine'], data['summary'], data['results']
  assert machine['interrupted'] and machine['threads'] == 1 and machine['total_s'] > 0
  assert machine['xla_flags'] == UNOPTIMIZED_FLAGS
  assert machine['jax'] and machine['flax'] and machine['torch']
  assert [r['spec'] for r in results] == [dataclasses.asdict(s) for s in SMALLEST[:-1]]
  result = {(r['spec']['framework'], r['spec']['task'], r['spec']['batch'], r['spec']['dtype']):
            r['result'] for r in results}

  gpu = lambda fields: {'peak_device_gib', 'device'} & set(fields)
  timing = {'seconds', 'median_s', 'min_s', 'max_s', 'images_per_s', 'peak_rss_gib', 'threads',
            'wall_s'}
  for entry in results[:6]:
    spec, measured = entry['spec'], entry['result']
    jax = ({'compile_s', 'device_count', 'flops_per_image'}
           if spec['framework'].startswith('jax') else set())
    profiled = {'op_seconds', 'top_ops'} if spec['profile'] else set()
    assert set(measured) == timing | jax | profiled | gpu(measured), entry
    assert len(measured['seconds']) == 1 and measured['median_s'] == measured['seconds'][0] > 0
    assert measured['images_per_s'] == pytest.approx(spec['batch'] / measured['median_s'])
    assert measured['threads'] == 1 and measured['peak_rss_gib'] > 0.1
    assert measured['wall_s'] > measured['median_s']
    if jax:
      assert measured['compile_s'] > 0 and measured['flops_per_image'] > 0
      assert measured['device_count'] == 1
  assert result['torch-compile', 'train', 2, 'float32'] == {
      'error': 'exit code 1: ValueError: torch-compile: only JAX runs micro-batches'}
  for framework in ('jax', 'torch-tuned'):
    matmul = result[framework, 'matmul', 1, 'float32']
    assert set(matmul) == {'seconds', 'matmul_size', 'gflops_per_s', 'peak_rss_gib', 'threads',
                           'wall_s'}
    assert len(matmul['seconds']) == 5 and matmul['gflops_per_s'] > 1
  flops = result['torch-tuned', 'flops', 1, 'float32']
  assert set(flops) == {'flops_per_image', 'train_flops_per_image', 'peak_rss_gib', 'threads',
                        'wall_s'}

  jax_train, jax_infer = result['jax', 'train', 8, 'float32'], result['jax', 'infer', 1, 'float32']
  jax_bf16 = result['jax', 'infer', 2, 'bfloat16']
  xla_convolutions = result['jax-xla-conv', 'infer', 1, 'float32']
  assert summary['ratios'] == {
      'infer tiny 32px batch 1: JAX / jax-xla-conv': pytest.approx(
          jax_infer['images_per_s'] / xla_convolutions['images_per_s']),
      'train tiny 32px batch 8: JAX / torch': pytest.approx(
          jax_train['images_per_s'] / result['torch', 'train', 8, 'float32']['images_per_s']),
      'infer tiny 32px batch 2 bfloat16: JAX / torch-tuned': pytest.approx(
          jax_bf16['images_per_s'] / result['torch-tuned', 'infer', 2, 'bfloat16']['images_per_s'])}
  peak = max(result[f, 'matmul', 1, 'float32']['gflops_per_s'] for f in ('jax', 'torch-tuned'))
  assert summary['matmul_peak_gflops_per_s'] == peak and summary['matmul_size'] == 2048
  assert summary['torch_flops_per_image'] == flops
  assert set(summary['utilisation']) == {'train tiny 32px batch 8', 'infer tiny 32px batch 1',
                                         'infer tiny 32px batch 2 bfloat16'}
  for key, (task, batch, dtype) in {'train tiny 32px batch 8': ('train', 8, 'float32'),
                                    'infer tiny 32px batch 1': ('infer', 1, 'float32'),
                                    'infer tiny 32px batch 2 bfloat16': ('infer', 2, 'bfloat16')
                                    }.items():
    measured, figures = result['jax', task, batch, dtype], summary['utilisation'][key]
    achieved = measured['flops_per_image'] * measured['images_per_s'] / 1e9
    assert figures == pytest.approx({'gflop_per_image': measured['flops_per_image'] / 1e9,
                                     'achieved_gflops_per_s': achieved, 'mfu': achieved / peak})
  # Both FLOP counts of the forward pass: XLA's cost analysis also counts the element-wise
  # work, the FFTs and the attention, torch's FlopCounterMode only matmuls and convolutions.
  torch_forward = flops['flops_per_image']
  jax_forward = jax_infer['flops_per_image']
  assert torch_forward <= jax_forward <= 3 * torch_forward
  # A training step is about three forward passes. (Micro-batches' FLOPs: test_throughput.py.)
  assert 2 * torch_forward <= flops['train_flops_per_image'] <= 4 * torch_forward
  assert 2 * jax_forward <= jax_train['flops_per_image'] <= 4 * jax_forward
  assert jax_bf16['flops_per_image'] == pytest.approx(jax_forward, rel=0.5)

  # The profiles find each op class in the traces (the model's named scopes, aten's names).
  ops = {'convolution', 'depthwise convolution', 'attention products', 'FFT',
         'phase: atan2, sin, cos', 'element-wise, reductions'}
  for framework, gradients in (('jax', {'convolution, input gradient',
                                        'convolution, kernel gradient'}),
                               ('torch', {'convolution, gradients'})):
    measured = result[framework, 'train', 8, 'float32']
    op_seconds, top_ops = measured['op_seconds'], measured['top_ops']
    assert list(op_seconds) == [name for name in profile.OP_CLASSES if name in op_seconds]
    assert min(op_seconds.values()) >= 0
    assert {name for name, seconds in op_seconds.items() if seconds > 0} >= ops | gradients
    # The costliest ops, each named (JAX: its HLO name and scope; PyTorch: aten's, and shapes).
    assert len(top_ops) == 20 and top_ops[0]['seconds'] <= op_seconds[top_ops[0]['class']]
    assert [op['seconds'] for op in top_ops] == sorted((op['seconds'] for op in top_ops),
                                                       reverse=True)
    assert set(top_ops[0]) == {'seconds', 'class', 'op'} | (
        {'scope'} if framework == 'jax' else {'shapes'})
  # With XLA's own convolutions the depthwise ones run as convolutions (the CPU path's as
  # fused shifted sums), among the call's costliest ops.
  native = result['jax-xla-conv', 'infer', 1, 'float32']['top_ops']
  depthwise = [op['op'] for op in native if op['class'] == 'depthwise convolution']
  assert depthwise and all(op.startswith('conv_general_dilated') for op in depthwise)

  text = report.format_report(results, summary, machine)
  assert printed.out == f"{text}\n\n(total {machine['total_s']:.0f} s, interrupted)\n"
  assert '| train step, tiny 32px, batch 8 |' in text and '| JAX / PyTorch eager |' in text
  assert '| inference, tiny 32px, batch 2, bfloat16 |' in text
  assert 'Matmul peak (2048x2048' in text
  assert ('| one call, s (share) | train tiny 32px b8, JAX (jit) | '
          "infer tiny 32px b1, JAX, XLA's convolutions | train tiny 32px b8, PyTorch eager |"
          ) in text
  assert '| convolution, kernel gradient | ' in text
  assert ('Failed measurements:\n- torch-compile (train tiny 32px): exit code 1: ValueError: '
          'torch-compile: only JAX runs micro-batches') in text
