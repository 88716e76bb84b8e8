"""What `fsmnet-parity train` concludes from its runs, in three levels of evidence:

1. Same algorithm (float64 runs): over the first steps the jax and torch losses agree to
   `FLOAT64_LOSS_TOLERANCE` (relative) and the parameters after them to
   `FLOAT64_PARAMS_TOLERANCE` of the size of their update.
2. Same numerics: per seed, the distance between the jax and torch parameters, relative to the
   size of the update so far, at log-spaced steps, against the reference's own distance under
   rounding-level changes (torch-ulp, torch-1thread against torch). float32: at most
   `FLOAT32_NOISE_FACTOR` times the larger of the two at every step; float64: at most
   `FLOAT64_NOISE_FACTOR` times torch-ulp's after the first steps.
3. Same result: final test PSNR/SSIM mean +- std per framework, and the difference of the
   means with its 95% confidence interval (paired by seed), which must contain 0 and lie within
   `SAME_RESULT_MARGIN`.
"""

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fsmnet_jax.files import write_together
from fsmnet_jax.model import abstract_params, build_model, count_params
from fsmnet_jax.reporting import new_figure
from torch_port.parity_runs import (REFERENCE, REFERENCE_NOISE, RUN_FILE, SNAPSHOTS_FILE,
                                    TABLE2_ROWS, run_name)

FLOAT64_STEPS = 3
FLOAT64_LOSS_TOLERANCE = 1e-9
FLOAT64_PARAMS_TOLERANCE = 1e-6
FLOAT64_NOISE_FACTOR = 10.0
FLOAT32_NOISE_FACTOR = 2.0
SAME_RESULT_MARGIN = {'eval_psnr': 1.0, 'eval_ssim': 0.01}
COMPARED = 'jax'
# The paper's Table 2 (BraTS, PSNR / SSIM) at 4x and 8x acceleration.
PAPER_TABLE2 = {
    'mdunet': {4: (37.94, 0.975), 8: (35.19, 0.960)},
    'fsfe': {4: (41.05, 0.985), 8: (37.97, 0.974)},
    'cms': {4: (41.39, 0.986), 8: (38.27, 0.975)},
    'fsmnet': {4: (41.76, 0.986), 8: (38.60, 0.977)},
}


def load_runs(runs_dir: Path) -> list[dict[str, Any]]:
  """Every finished run's run.json, by framework and seed."""
  runs = [json.loads(path.read_text()) for path in runs_dir.glob(f'*/{RUN_FILE}')]
  return sorted(runs, key=lambda run: (run['framework'], run['seed']))


def _relative_distances(runs_dir: Path, name: str, other: str) -> dict[int, float]:
  """|params_name - params_other| / |params_other - initial| at each snapshot step."""
  with np.load(runs_dir / name / SNAPSHOTS_FILE) as a, \
       np.load(runs_dir / other / SNAPSHOTS_FILE) as b:
    initial = b['step_0'].astype(np.float64)
    distances = {}
    for key in sorted(set(a.files) & set(b.files) - {'step_0'}):
      x, y = a[key].astype(np.float64), b[key].astype(np.float64)
      distances[int(key.removeprefix('step_'))] = _ratio(np.linalg.norm(x - y),
                                                         np.linalg.norm(y - initial))
  return distances


def _ratio(value: float, reference: float) -> float:
  """value / reference, with 0 / 0 = 0 (nothing moved, nothing differs)."""
  if reference == 0:
    return 0.0 if value == 0 else math.inf
  return float(value / reference)


def divergence(runs_dir: Path, runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per seed and per framework compared with the reference: the relative loss difference at
  every step and the relative parameter distance at each snapshot step."""
  by_name = {run_name(r['framework'], r['seed']): r for r in runs}
  result = {}
  for seed in sorted({r['seed'] for r in runs}):
    reference = by_name.get(run_name(REFERENCE, seed))
    if reference is None:
      continue
    curves = {}
    for framework in (COMPARED, *REFERENCE_NOISE):
      other = by_name.get(run_name(framework, seed))
      if other is None:
        continue
      curves[framework] = {
          'loss': [abs(a - b) / abs(b) for a, b in zip(other['losses'], reference['losses'])],
          'params': _relative_distances(runs_dir, run_name(framework, seed),
                                        run_name(REFERENCE, seed))}
    if curves:
      result[str(seed)] = curves
  return result


def noise_verdict(curves: dict[str, Any], float64: bool) -> dict[str, Any] | None:
  """Level 2 (and level 1 in float64) for one seed, or None without the runs it needs."""
  if COMPARED not in curves:
    return None
  ours = curves[COMPARED]
  verdict = {}
  if float64:
    first = ours['loss'][:FLOAT64_STEPS]
    params = ours['params'].get(min(FLOAT64_STEPS, max(ours['params'])))
    verdict['same_algorithm'] = {
        'loss_differences': first, 'params_distance': params,
        'passed': bool(max(first) < FLOAT64_LOSS_TOLERANCE
                       and params < FLOAT64_PARAMS_TOLERANCE)}
  noise = [framework for framework in (REFERENCE_NOISE[:1] if float64 else REFERENCE_NOISE)
           if framework in curves]
  if noise:
    factor = FLOAT64_NOISE_FACTOR if float64 else FLOAT32_NOISE_FACTOR
    ratios = {step: _ratio(distance, max(curves[f]['params'].get(step, 0.0) for f in noise))
              for step, distance in ours['params'].items()
              if not (float64 and step <= FLOAT64_STEPS)}
    # None: no step to judge (a float64 run of no more than FLOAT64_STEPS steps).
    passed = all(r <= factor for r in ratios.values()) if ratios else None
    verdict['same_numerics'] = {'against': noise, 'factor': factor, 'ratios': ratios,
                                'passed': passed}
  return verdict


def paired_difference(ours: dict[int, float], theirs: dict[int, float]
                       ) -> dict[str, float] | None:
  """Mean over seeds of ours - theirs, with its 95% confidence interval (Student's t over the
  per-seed differences: runs of one seed share their initial weights and batches, so pairing
  takes that shared part of the spread out). None under 2 seeds run by both."""
  seeds = sorted(set(ours) & set(theirs))
  if len(seeds) < 2:
    return None
  differences = [ours[s] - theirs[s] for s in seeds]
  mean = statistics.fmean(differences)
  half_width = (float(stats.t.ppf(0.975, len(seeds) - 1))
                * statistics.stdev(differences) / math.sqrt(len(seeds)))
  return {'difference': mean, 'low': mean - half_width, 'high': mean + half_width,
          'seeds': len(seeds)}


def summarize(runs_dir: Path, runs: list[dict[str, Any]], float64: bool) -> dict[str, Any]:
  """The three levels (see the module docstring) from the finished runs."""
  final = {}  # framework -> metric -> seed -> value
  for run in runs:
    for metric in SAME_RESULT_MARGIN:
      final.setdefault(run['framework'], {}).setdefault(metric, {})[run['seed']] = (
          run['eval'][metric])
  results = {framework: {metric: {'mean': statistics.fmean(values.values()),
                                  'std': statistics.stdev(values.values())
                                         if len(values) > 1 else 0.0,
                                  'min': min(values.values()), 'max': max(values.values()),
                                  'seeds': len(values)}
                         for metric, values in metrics.items()}
             for framework, metrics in final.items()}
  same_result = None
  if COMPARED in final and REFERENCE in final:
    same_result = {}
    for metric, margin in SAME_RESULT_MARGIN.items():
      interval = paired_difference(final[COMPARED][metric], final[REFERENCE][metric])
      if interval is not None:
        interval['passed'] = (interval['low'] <= 0 <= interval['high']
                              and -margin <= interval['low'] and interval['high'] <= margin)
        interval['margin'] = margin
      same_result[metric] = interval
  curves = divergence(runs_dir, runs)
  verdicts = {seed: v for seed, c in curves.items() if (v := noise_verdict(c, float64))}
  return {'results': results, 'same_result': same_result, 'divergence': curves,
          'verdicts': verdicts}


def _format_interval(interval: dict[str, Any] | None) -> str:
  if interval is None:
    return 'needs at least 2 seeds of each'
  return (f"{interval['difference']:+.4g} [{interval['low']:+.4g}, {interval['high']:+.4g}]: "
          f"{'PASS' if interval['passed'] else 'FAIL'} (contains 0, within "
          f"+-{interval['margin']:g})")


def markdown(settings: dict[str, Any], summary: dict[str, Any]) -> str:
  """report.md: the settings, the three levels' tables and verdicts, the plots."""
  lines = ['# fsmnet-parity train', '',
           f"{settings['steps']} steps, {settings['dtype']}, config `{settings['config_file']}`"
           f" ({settings['overrides'] or 'no overrides'}); machine: {settings['machine']}.",
           '',
           '## Final test metrics (reference convention)', '',
           '| framework | seeds | PSNR mean +- std (min-max) | SSIM mean +- std (min-max) |',
           '|---|---|---|---|']
  for framework, metrics in summary['results'].items():
    cells = [f"{m['mean']:.3f} +- {m['std']:.3f} ({m['min']:.3f}-{m['max']:.3f})"
             if name == 'eval_psnr' else
             f"{m['mean']:.4f} +- {m['std']:.4f} ({m['min']:.4f}-{m['max']:.4f})"
             for name, m in metrics.items()]
    lines.append(f"| {framework} | {metrics['eval_psnr']['seeds']} | {' | '.join(cells)} |")
  if summary['same_result'] is not None:
    lines += ['', f'Difference of the means, {COMPARED} - {REFERENCE}, with its 95% confidence '
              'interval (paired by seed: same initial weights and batches):', '']
    lines += [f'- {metric}: {_format_interval(interval)}'
              for metric, interval in summary['same_result'].items()]
  for seed, verdict in summary['verdicts'].items():
    lines += ['', f'## Seed {seed}: divergence from the reference', '']
    if 'same_algorithm' in verdict:
      level = verdict['same_algorithm']
      lines.append(f"- float64, first {FLOAT64_STEPS} steps: loss differences "
                   f"{', '.join(f'{d:.1e}' for d in level['loss_differences'])} (< "
                   f"{FLOAT64_LOSS_TOLERANCE:g}), parameters {level['params_distance']:.1e} of "
                   f"their update (< {FLOAT64_PARAMS_TOLERANCE:g}): "
                   f"{'PASS' if level['passed'] else 'FAIL'}")
    if 'same_numerics' in verdict:
      level = verdict['same_numerics']
      worst = max(level['ratios'].values(), default=0.0)
      outcome = {True: 'PASS', False: 'FAIL', None: 'no step after the first ones to judge'}
      lines.append(f"- parameter distance jax-torch over the reference's own "
                   f"({', '.join(level['against'])}): worst {worst:.2f} (<= "
                   f"{level['factor']:g}): {outcome[level['passed']]}")
    curves = summary['divergence'][seed]
    steps = sorted(curves[COMPARED]['params'])
    lines += ['', '| step | ' + ' | '.join(f'{f} vs {REFERENCE}' for f in curves) + ' |',
              '|---' * (len(curves) + 1) + '|']
    lines += [f'| {step} | ' + ' | '.join(f"{c['params'].get(step, math.nan):.2e}"
                                          for c in curves.values()) + ' |' for step in steps]
  lines += ['', '![curves](curves.png)', '', '![divergence](divergence.png)', '']
  return '\n'.join(lines)


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
  """Training loss and test PSNR against step: each framework's mean over seeds, with its
  min-max band (the reference-noise runs, of fewer seeds, left out)."""
  figure = new_figure((12, 4.5))
  loss_axis, psnr_axis = figure.subplots(1, 2)
  frameworks = {r['framework'] for r in runs}
  for framework in sorted(frameworks - set(REFERENCE_NOISE) or frameworks):
    mine = [r for r in runs if r['framework'] == framework]
    losses = np.array([r['losses'] for r in mine])
    steps = np.arange(1, losses.shape[1] + 1)
    line, = loss_axis.plot(steps, losses.mean(0), label=framework, lw=1)
    loss_axis.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(),
                           alpha=0.2)
    _plot_test_psnr(psnr_axis, mine, framework, line.get_color())
  loss_axis.set(xlabel='step', ylabel='training loss', yscale='log')
  for axis in (loss_axis, psnr_axis):
    axis.grid(alpha=0.3)
    axis.legend()
  figure.suptitle(f'mean over seeds, band: min-max ({len({r["seed"] for r in runs})} seeds)')
  figure.savefig(path, dpi=100, bbox_inches='tight')


def _plot_test_psnr(axis: Any, runs: list[dict[str, Any]], label: str, color: Any = None
                    ) -> None:
  """Test PSNR against step of `runs` (one network, one framework): mean, min-max band."""
  eval_steps = sorted(runs[0]['evals'], key=int)
  psnr = np.array([[r['evals'][s]['eval_psnr'] for s in eval_steps] for r in runs])
  at = [int(s) for s in eval_steps]
  line, = axis.plot(at, psnr.mean(0), marker='o', label=label, color=color)
  axis.fill_between(at, psnr.min(0), psnr.max(0), color=line.get_color(), alpha=0.2)
  axis.set(xlabel='step', ylabel='test PSNR (dB, reference convention)')


def plot_table2(reports: dict[str, dict[str, Any]], path: Path) -> None:
  """Test PSNR against step of each Table 2 network (and framework): mean over seeds, min-max
  band."""
  figure = new_figure((8, 5))
  axis = figure.subplots()
  for row, report in reports.items():
    for framework in sorted({r['framework'] for r in report['runs']}):
      runs = [r for r in report['runs'] if r['framework'] == framework]
      _plot_test_psnr(axis, runs, f'{TABLE2_ROWS[row]} ({framework}, {len(runs)} seeds)')
  axis.grid(alpha=0.3)
  axis.legend(fontsize=8)
  figure.suptitle('Table 2 in miniature: mean over seeds, band: min-max')
  figure.savefig(path, dpi=100, bbox_inches='tight', format='png')


def plot_divergence(curves: dict[str, dict[str, Any]], path: Path) -> None:
  """Parameter distance and loss difference from the reference, per seed and framework."""
  figure = new_figure((12, 4.5))
  params_axis, loss_axis = figure.subplots(1, 2)
  styles = {COMPARED: '-', **{f: ':' for f in REFERENCE_NOISE}}
  colors = {}  # one per framework, labelled once
  for by_framework in curves.values():
    for framework, curve in by_framework.items():
      steps = sorted(curve['params'])
      label = None if framework in colors else f'{framework} vs {REFERENCE}'
      # Exact agreement (0) drawn at the plot's floor rather than left out.
      line, = params_axis.plot(steps, [max(curve['params'][s], 1e-20) for s in steps],
                               styles[framework], marker='.', color=colors.get(framework),
                               label=label)
      colors.setdefault(framework, line.get_color())
      loss = np.array(curve['loss'])
      loss_axis.plot(np.arange(1, len(loss) + 1), np.where(loss > 0, loss, np.nan),
                     styles[framework], marker='.', lw=0.8, color=colors[framework])
  params_axis.set(xscale='log', yscale='log', xlabel='step',
                  ylabel='|params - reference| / |reference - initial|')
  loss_axis.set(xscale='log', yscale='log', xlabel='step',
                ylabel='|loss - reference loss| / reference loss (0: not drawn)')
  for axis in (params_axis, loss_axis):
    axis.grid(alpha=0.3, which='both')
  if colors:
    params_axis.legend()
  figure.suptitle(f'divergence from {REFERENCE}, {len(curves)} seed(s)')
  figure.savefig(path, dpi=100, bbox_inches='tight')


def _json_safe(value: Any) -> Any:
  """`value` with infinities and NaN as strings, which strict JSON readers accept."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def failed(report: dict[str, Any]) -> list[str]:
  """The verdicts of `report` that failed, by name."""
  names = [f'same result ({metric})' for metric, interval in (report['same_result'] or {}).items()
           if interval is not None and not interval['passed']]
  for seed, verdict in report['verdicts'].items():
    names += [f'{level} (seed {seed})' for level, result in verdict.items()
              if result['passed'] is False]
  return names


def write_report(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
  """report.json, report.md, curves.png and divergence.png in `out` from its finished runs
  (replacing earlier ones together); returns report.json's contents."""
  runs_dir = out / 'runs'
  runs = load_runs(runs_dir)
  summary = summarize(runs_dir, runs, settings['dtype'] == 'float64')
  report = {'settings': settings, **summary,
            'runs': [{k: r[k] for k in ('framework', 'seed', 'dtype', 'losses', 'eval', 'evals',
                                        'learning_rates', 'seconds')} for r in runs]}
  write_together({
      out / 'report.json': lambda tmp: tmp.write_text(json.dumps(_json_safe(report), indent=1)),
      out / 'report.md': lambda tmp: tmp.write_text(markdown(settings, summary)),
      out / 'curves.png': lambda tmp: plot_curves(runs, tmp),
      out / 'divergence.png': lambda tmp: plot_divergence(summary['divergence'], tmp),
  }, overwrite=True)
  return report


def write_table2(out: Path, reports: dict[str, dict[str, Any]], acceleration: int) -> str:
  """OUT/table2.md and table2.json: each Table 2 row's final test metrics (mean +- std over
  seeds, per framework) beside the paper's, and table2.png: their test PSNR against step;
  returns the Markdown."""
  paper = {row: values.get(acceleration) for row, values in PAPER_TABLE2.items()}
  rows = []
  for row, report in reports.items():
    settings = report['settings']
    model = build_model(settings['config'])
    for framework, metrics in report['results'].items():
      rows.append({'row': row, 'network': TABLE2_ROWS[row], 'framework': framework,
                   'parameters': count_params(abstract_params(model)),
                   'steps': settings['steps'], **metrics, 'paper': paper[row]})
  first = next(iter(reports.values()))['settings']
  lines = [f"# Table 2 in miniature ({acceleration}x)", '',
           f"{first['steps']} steps per run, config `{first['config_file']}` "
           f"({first['overrides'] or 'no overrides'}); machine: {first['machine']}. Paper: "
           'BraTS at full size, 100k steps.', '',
           '| network | framework | parameters | seeds | PSNR | SSIM | paper PSNR / SSIM |',
           '|---|---|---|---|---|---|---|']
  for r in rows:
    psnr, ssim = r['eval_psnr'], r['eval_ssim']
    reference = f'{r["paper"][0]:.2f} / {r["paper"][1]:.3f}' if r['paper'] else '-'
    lines.append(f"| {r['network']} | {r['framework']} | {r['parameters']:,} | {psnr['seeds']} "
                 f"| {psnr['mean']:.2f} +- {psnr['std']:.2f} | {ssim['mean']:.4f} +- "
                 f"{ssim['std']:.4f} | {reference} |")
  text = '\n'.join(lines) + '\n'
  write_together({
      out / 'table2.md': lambda tmp: tmp.write_text(text),
      out / 'table2.json': lambda tmp: tmp.write_text(json.dumps({'rows': rows}, indent=1)),
      out / 'table2.png': lambda tmp: plot_table2(reports, tmp),
  }, overwrite=True)
  return text
