"""fsmnet-bench's report: machine facts, ratios and utilisation, Markdown tables, JSON."""

import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from fsmnet_bench.launch import xla_flags
from fsmnet_bench.plan import FRAMEWORK_TITLES, FRAMEWORKS
from fsmnet_bench.profile import OP_CLASSES
from fsmnet_jax.files import write_atomically
from fsmnet_jax.reporting import cpu_model


def machine_info(cpus: list[int]) -> dict:
  """Date, CPU, the CPUs used, the XLA_FLAGS the JAX workers inherit and the installed versions
  of Python, jax, flax and torch."""
  info = {'date': datetime.date.today().isoformat(), 'python': platform.python_version(),
          'platform': platform.platform(), 'cpus_used': cpus, 'threads': len(cpus),
          'cpu_model': cpu_model(), 'xla_flags': xla_flags(os.environ.get('XLA_FLAGS', ''), 1)}
  for package in ('jax', 'jaxlib', 'flax', 'torch'):
    try:  # the installed version, without importing it (and starting an accelerator) here
      info[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      info[package] = None
  return info


def _find(results: list[dict], **fields) -> dict | None:
  """The result of the measurement with these spec fields, if it succeeded."""
  result = _find_any(results, **fields)
  return None if result is None or 'error' in result else result


def _find_any(results: list[dict], **fields) -> dict | None:
  """The result of the measurement with these spec fields, failed ones included."""
  for entry in results:
    if all(entry['spec'][k] == v for k, v in fields.items()):
      return entry['result']
  return None


def summarize(results: list[dict]) -> dict:
  """Ratios JAX / PyTorch (throughput; > 1: JAX is faster), FLOP rates and utilisation."""
  main = [r for r in results if r['spec']['group'] == 'main']
  matmuls = [r['result'] for r in main
             if r['spec']['task'] == 'matmul' and 'error' not in r['result']]
  best = max(matmuls, key=lambda r: r['gflops_per_s'], default={})
  summary: dict[str, Any] = {'matmul_peak_gflops_per_s': best.get('gflops_per_s'),
                             'matmul_size': best.get('matmul_size'),
                             'ratios': {}, 'utilisation': {}}
  torch_flops = _find(main, task='flops')
  if torch_flops:
    summary['torch_flops_per_image'] = torch_flops
  for entry in main:
    spec, result = entry['spec'], entry['result']
    if spec['framework'] != 'jax' or spec['task'] not in ('train', 'infer') or 'error' in result:
      continue
    key = f"{spec['task']} {spec['model']} {spec['size']}px batch {spec['batch']}"
    if spec['dtype'] != 'float32':
      key += f" {spec['dtype']}"
    same = dict(task=spec['task'], model=spec['model'], size=spec['size'], batch=spec['batch'])
    for other in ('jax-xla-conv', 'torch', 'torch-tuned', 'torch-compile'):
      theirs = _find(main, framework=other, dtype=spec['dtype'], **same)
      if theirs:
        summary['ratios'][f'{key}: JAX / {other}'] = result['images_per_s'] / theirs['images_per_s']
    in_float32 = _find(main, framework='jax', dtype='float32', **same)
    if spec['dtype'] != 'float32' and in_float32:
      summary['ratios'][f'{key}: JAX / JAX float32'] = (result['images_per_s']
                                                        / in_float32['images_per_s'])
    flops = result.get('flops_per_image', 0.0)
    if flops:
      achieved = flops * result['images_per_s'] / 1e9
      summary['utilisation'][key] = {
          'gflop_per_image': flops / 1e9, 'achieved_gflops_per_s': achieved,
          'mfu': achieved / summary['matmul_peak_gflops_per_s']
                 if summary['matmul_peak_gflops_per_s'] else None}
  return summary


def _cell(result: dict | None, batch: int) -> str:
  """A throughput cell: images/s, median (range), or why there is none."""
  if result is None:
    return '–'
  if 'error' in result:
    return 'failed'
  low, high = batch / result['max_s'], batch / result['min_s']
  return f"{result['images_per_s']:.3g} ({low:.3g}–{high:.3g})"


def format_report(results: list[dict], summary: dict, info: dict) -> str:
  """Markdown tables: throughput per framework, then memory, compile time, FLOPs; sweeps."""
  accelerators = sorted({r['result']['device'] for r in results if 'device' in r['result']})
  on = f" and {', '.join(accelerators)} (TF32 float32 arithmetic)" if accelerators else ''
  lines = [f"fsmnet-bench, {info['date']}: {info['cpu_model']}, {info['threads']} threads "
           f"(CPUs {info['cpus_used']}){on}; jax {info['jax']}, flax {info['flax']}, "
           f"torch {info['torch']}, Python {info['python']}"
           + (f"; XLA_FLAGS {info['xla_flags']}" if info.get('xla_flags') else '') + '.', '']
  main = [r for r in results if r['spec']['group'] == 'main']
  frameworks = [f for f in FRAMEWORKS if any(r['spec']['framework'] == f
                                              and r['spec']['task'] in ('train', 'infer')
                                              for r in main)]
  rows = []
  for entry in main:
    spec = entry['spec']
    if spec['task'] in ('train', 'infer'):
      row = (spec['task'], spec['model'], spec['size'], spec['batch'], spec['dtype'])
      if row not in rows:
        rows.append(row)
  if not rows:  # a sweeps-only run
    return '\n'.join(lines + _failure_lines(results) + _sweep_tables(results))
  header = ['images/s, median (range)'] + [FRAMEWORK_TITLES[f] for f in frameworks]
  ratio_columns = [f for f in frameworks if f != 'jax']
  header += [f'JAX / {FRAMEWORK_TITLES[f]}' for f in ratio_columns if 'jax' in frameworks]
  lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  memory_lines, device_memory_lines, compile_lines = [], [], []
  for task, model, size, batch, dtype in rows:
    fields = dict(task=task, model=model, size=size, batch=batch, dtype=dtype)
    cells = {f: _find_any(main, framework=f, **fields) for f in frameworks}
    name = ('train step' if task == 'train' else 'inference') + f', {model} {size}px, batch {batch}'
    if dtype != 'float32':
      name += f', {dtype}'
    line = [name] + [_cell(cells[f], batch) for f in frameworks]
    if 'jax' in frameworks:
      for f in ratio_columns:
        ok = cells['jax'] and cells[f] and 'error' not in cells['jax'] and 'error' not in cells[f]
        line.append(f"{cells['jax']['images_per_s'] / cells[f]['images_per_s']:.2f}x" if ok
                    else '–')
    lines.append('| ' + ' | '.join(line) + ' |')
    for table, field in ((memory_lines, 'peak_rss_gib'), (device_memory_lines, 'peak_device_gib')):
      table.append('| ' + ' | '.join(
          [name] + [f"{cells[f][field]:.2f}" if cells[f] and field in cells[f] else '–'
                    for f in frameworks]) + ' |')
    compile_cells = [f"{cells[f]['compile_s']:.1f}" if cells[f] and 'compile_s' in cells[f]
                     else '–' for f in frameworks]
    compile_lines.append('| ' + ' | '.join([name] + compile_cells) + ' |')
  titles = [FRAMEWORK_TITLES[f] for f in frameworks]
  lines += ['', '| peak host RSS, GiB | ' + ' | '.join(titles) + ' |',
            '|' + '---|' * (len(titles) + 1), *memory_lines]
  if accelerators:
    lines += ['', '| peak device memory, GiB | ' + ' | '.join(titles) + ' |',
              '|' + '---|' * (len(titles) + 1), *device_memory_lines]
  lines += ['', '| compile / first call, s | ' + ' | '.join(titles) + ' |',
            '|' + '---|' * (len(titles) + 1), *compile_lines]
  micro = sorted({(r['spec']['batch'], r['spec']['micro_batches']) for r in main
                  if r['spec']['micro_batches'] > 1})
  for batch, count in micro:
    lines += ['', f'JAX trains batch {batch} as {count} micro-batches '
                  f'(config.train.grad_accum_steps={count}): the same gradient, accumulated.']
  peak = summary['matmul_peak_gflops_per_s']
  size = summary['matmul_size']
  lines += ['', f"Matmul peak ({size}x{size} float32, best of both frameworks): "
                f"{peak:.0f} GFLOP/s." if peak else 'Matmul peak: not measured.']
  flops = summary.get('torch_flops_per_image')
  if flops:
    lines.append(f"torch FlopCounterMode at the first row's model and size: forward "
                 f"{flops['flops_per_image'] / 1e9:.1f} GFLOP/image, training step "
                 f"{flops['train_flops_per_image'] / 1e9:.1f} GFLOP/image.")
  if summary['utilisation']:
    lines += ['', '| JAX (XLA cost analysis) | GFLOP/image | achieved GFLOP/s | MFU |',
              '|---|---|---|---|']
    for key, value in summary['utilisation'].items():
      mfu = f"{100 * value['mfu']:.0f}%" if value['mfu'] is not None else '–'
      lines.append(f"| {key} | {value['gflop_per_image']:.1f} | "
                   f"{value['achieved_gflops_per_s']:.0f} | {mfu} |")
  return '\n'.join(lines + _profile_table(main) + _failure_lines(results)
                   + _sweep_tables(results))


def _profile_table(main: list[dict]) -> list[str]:
  """Seconds of one call per op class (share of the call), a column per profiled measurement."""
  profiled = [r for r in main if 'op_seconds' in r['result']]
  if not profiled:
    return []
  titles = [f"{r['spec']['task']} {r['spec']['model']} {r['spec']['size']}px b{r['spec']['batch']}"
            + (f" {r['spec']['dtype']}" if r['spec']['dtype'] != 'float32' else '')
            + f", {FRAMEWORK_TITLES[r['spec']['framework']]}" for r in profiled]
  lines = ['', '| one call, s (share) | ' + ' | '.join(titles) + ' |',
           '|' + '---|' * (len(titles) + 1)]
  for name in OP_CLASSES:
    if any(name in r['result']['op_seconds'] for r in profiled):
      cells = []
      for entry in profiled:
        seconds = entry['result']['op_seconds']
        share = seconds.get(name, 0.0) / sum(seconds.values())
        cells.append(f"{seconds[name]:.3g} ({100 * share:.0f}%)" if name in seconds else '–')
      lines.append(f"| {name} | " + ' | '.join(cells) + ' |')
  return lines


def _failure_lines(results: list[dict]) -> list[str]:
  """The list of failed measurements and their errors (none: no lines)."""
  failures = [f"{entry['spec']['framework']} ({entry['spec']['task']} {entry['spec']['model']} "
              f"{entry['spec']['size']}px): {entry['result']['error']}"
              for entry in results if 'error' in entry['result']]
  return ['', 'Failed measurements:', *(f'- {failure}' for failure in failures)] if failures else []


def _sweep_tables(results: list[dict]) -> list[str]:
  """One table for each sweep measured: seconds per call, images/s and memory."""
  lines = []
  titles = {'size': ('image size', 'size'), 'batch': ('batch size', 'batch'),
            'devices': ('forced host devices', 'devices')}
  for group, (title, field) in titles.items():
    entries = [r for r in results if r['spec']['group'] == group]
    if not entries:
      continue
    lines += ['', f'| {title} | task | framework | s per call, median (range) | images/s | '
                  f'peak RSS GiB |', '|---|---|---|---|---|---|']
    for entry in entries:
      spec, result = entry['spec'], entry['result']
      if 'error' in result:
        lines.append(f"| {spec[field]} | {spec['task']} | {spec['framework']} | failed: "
                     f"{result['error'][:80]} | – | – |")
        continue
      lines.append(f"| {spec[field]} | {spec['task']} {spec['model']} {spec['size']}px "
                   f"b{spec['batch']} | {FRAMEWORK_TITLES[spec['framework']]} | "
                   f"{result['median_s']:.3g} ({result['min_s']:.3g}–{result['max_s']:.3g}) | "
                   f"{result['images_per_s']:.3g} | {result['peak_rss_gib']:.2f} |")
  return lines


def write_json(path: Path, info: dict, results: list[dict]) -> None:
  """Writes the machine, the summary and every result to `path`, atomically."""
  text = json.dumps({'machine': info, 'summary': summarize(results), 'results': results},
                    indent=2) + '\n'
  write_atomically(path, lambda temporary: temporary.write_text(text), overwrite=True)
