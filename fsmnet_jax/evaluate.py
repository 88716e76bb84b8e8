"""Evaluation on a data split: the network next to zero-filling, in the paper's Table 1 form.

`SplitEvaluator` runs the one jitted `eval_step` over a split; training evaluates with it, and
`evaluate(config, params, model, out_dir)` (fsmnet-eval) scores every slice with it, sharded over
the devices of every process, and writes into `out_dir` (atomically: complete or absent):
  metrics.json      settings, counts, mean/std per method in both metric conventions
  table1.md         method x {PSNR, SSIM, NMSE} as mean ± std (Table 1 of the paper)
  slices.csv        subject, slice and every method's metrics, one row per slice
  volumes.csv       the fastMRI convention, one row per subject/volume
  panels/*.png      reference | zero-filled | network | ground truth | error map, a few slices
  psnr_per_slice.png  PSNR against the slice's position in its volume
"""

import csv
import dataclasses
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fsmnet_jax import conv, mesh as mesh_lib, metrics
from fsmnet_jax.data import DataError, kspace, pipeline, transforms
from fsmnet_jax.files import as_path, refuse_existing, write_folder
from fsmnet_jax.inference import PRECISIONS, data_consistency, pad_rows
from fsmnet_jax.model import FSMNet, apply_in_dtype
from fsmnet_jax.reporting import ProgressBar, new_figure

# Method keys of the reports (metrics.json, the CSV columns): 'fsmnet' is the evaluated
# network, whichever it is (its name is in metrics.json's 'network' and labels the tables).
METHODS = ('zero_filled', 'fsmnet', 'fsmnet_dc')
METRICS = ('psnr', 'ssim', 'nmse')
ERROR_MAP_MAX = 0.1  # error-map colour scale: 0 .. 10% of the slice's ground-truth maximum
BATCH_KEYS = ('target_under', 'aux', 'target', 'mask', 'mean', 'std')


def eval_step(params: Any, batch: dict[str, jax.Array], *, apply_fn: Callable,
              with_data_consistency: bool = False, with_images: bool = False,
              compute_dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
  """Per-slice metrics (reference convention) of each method, the network run in
  `compute_dtype` and scored in float32; `with_images`, the images too, as intensities."""
  outputs = apply_in_dtype(apply_fn, params, batch['target_under'], batch['aux'], compute_dtype)
  intensity = lambda x: transforms.denormalize_images(x, batch['mean'], batch['std'])
  target = intensity(batch['target'])
  images = {'zero_filled': intensity(batch['target_under']),
            'fsmnet': intensity(outputs['img_out'].astype(jnp.float32))}
  if with_data_consistency:
    # The target's own k-space holds the measured samples (exact for simulated undersampling).
    images['fsmnet_dc'] = data_consistency(images['fsmnet'], kspace.fft2c_jnp(target),
                                           batch['mask'])
  result = {'metrics': {m: metrics.reference_metrics(target, x) for m, x in images.items()}}
  if with_images:
    result['images'] = {**images, 'target': target, 'aux': batch['aux'][..., 0]}
  return result


def even_shares(num_records: int, num_processes: int, global_batch: int, max_batches: int = 0
                ) -> list[range]:
  """The record keys each process evaluates: consecutive ranges of even length, of the whole
  split or, with `max_batches`, of its first `max_batches` global batches whatever the number
  of processes (each process's own first batches would be another subset for every count)."""
  limit = min(num_records, max_batches * global_batch) if max_batches else num_records
  return pipeline.even_ranges(limit, num_processes)


class SplitEvaluator:
  """Scores every slice of a split with one jitted `eval_step`, its batches split over the
  `data` axis of `mesh` (training and fsmnet-eval: all processes' devices).

  Each process of the mesh reads its own share of the slices: consecutive slices of even
  counts, or with `whole_volumes` whole volumes each (per-volume scores need no other process's
  slices); all take part in every step (a process out of slices pads with zero rows), and every
  process gets the scores of all rows.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, apply_fn: Callable,
               split: str = 'test', *, with_data_consistency: bool = False,
               with_images: bool = False, max_batches: int = 0, whole_volumes: bool = False,
               compute_dtype: jnp.dtype = jnp.float32):
    self.source = pipeline.make_source(config, split)
    mesh_processes = mesh_lib.processes(mesh)
    data_size = mesh.shape['data']
    global_batch = math.ceil(config.eval.batch_size / data_size) * data_size
    self.batch_size = global_batch // len(mesh_processes)  # rows of this process in each step
    self._image_size = config.data.image_size
    rank = mesh_processes.index(jax.process_index())
    shares = (pipeline.volume_ranges(self.source, len(mesh_processes)) if whole_volumes
              else even_shares(len(self.source), len(mesh_processes), global_batch, max_batches))
    self._loader = pipeline.make_loader(config, split, self.batch_size, num_epochs=1,
                                        shuffle=False, source=self.source, records=shares[rank])
    self.num_slices = len(shares[rank])  # of this process
    self._num_batches = math.ceil(max(map(len, shares)) / self.batch_size)
    self._rows = mesh_lib.rows(mesh)
    self._own_rows = mesh_lib.process_rows(self._rows, global_batch)
    step = conv.specialized_for(mesh_lib.platform(mesh), functools.partial(
        eval_step, apply_fn=apply_fn, with_data_consistency=with_data_consistency,
        with_images=with_images, compute_dtype=compute_dtype))
    # Every process gets every row's scores (a few floats per slice): global means need them.
    self._step = jax.jit(lambda params, batch: (step(params, batch), batch['valid']),
                         in_shardings=(mesh_lib.replicated(mesh), self._rows),
                         out_shardings=mesh_lib.replicated(mesh))

  def __call__(self, params: Any) -> dict[str, float]:
    """Mean `eval_`-prefixed metrics of FSMNet and zero-filling over the split (or its first
    `max_batches` batches), the same on every process."""
    sums, count = {}, 0
    for _, result, valid in self._batches(params):
      count += int(valid.sum())
      for method, prefix in (('fsmnet', ''), ('zero_filled', 'zero_filled_')):
        for name, values in result['metrics'][method].items():
          sums[prefix + name] = sums.get(prefix + name, 0.0) + float(
              np.sum(values[valid], dtype=np.float64))
    return {f'eval_{name}': value / count for name, value in sums.items()}

  def slices(self, params: Any) -> Iterator[tuple[int, dict[str, dict[str, float]],
                                                  dict[str, np.ndarray]]]:
    """(record key, {method: {metric: value}}, images by name or {}) of each of this
    process's slices, in record order."""
    for keys, result, _ in self._batches(params):
      for key, row in zip(keys, self._own_rows):
        yield (key, {m: {k: float(v[row]) for k, v in by_metric.items()}
                     for m, by_metric in result['metrics'].items()},
               {name: image[row] for name, image in result.get('images', {}).items()})

  def _batches(self, params: Any) -> Iterator[tuple[list[int], dict[str, Any], np.ndarray]]:
    """(this process's record keys, the step's result for all rows, which rows are real)."""
    batches = iter(self._loader)
    for _ in range(self._num_batches):
      local = next(batches, None)
      keys = [] if local is None else [int(k) for k in local['key']]
      padded = {k: pad_rows(local[k] if local else self._no_rows(k), self.batch_size)
                for k in BATCH_KEYS}
      padded['valid'] = np.arange(self.batch_size) < len(keys)
      result, valid = jax.device_get(self._step(params, mesh_lib.global_batch(padded,
                                                                              self._rows)))
      yield keys, result, valid

  def _no_rows(self, key: str) -> np.ndarray:
    shape = {'mean': (0,), 'std': (0,), 'mask': (0, self._image_size, self._image_size)}
    return np.zeros(shape.get(key, (0, self._image_size, self._image_size, 1)), np.float32)


def _volume_scores(images: dict[str, list[np.ndarray]], ssim_fn: Callable, batch: int
                   ) -> dict[str, dict[str, float]]:
  """fastMRI-convention metrics of one volume per method (range: the target volume's max)."""
  target = np.stack(images['target'])
  data_range = np.float32(target.max())
  scores = {}
  for method in (m for m in METHODS if m in images):
    prediction = np.stack(images[method])
    squared_error = float(np.sum((target.astype(np.float64) - prediction) ** 2))
    ssims = [np.asarray(ssim_fn(pad_rows(target[i:i + batch], batch),
                                pad_rows(prediction[i:i + batch], batch), data_range)
                        )[:len(target[i:i + batch])] for i in range(0, len(target), batch)]
    scores[method] = {
        'psnr': 10 * math.log10(float(data_range) ** 2 / (squared_error / target.size)),
        'ssim': float(np.mean(np.concatenate(ssims))),
        'nmse': squared_error / float(np.sum(target.astype(np.float64) ** 2))}
  return scores


def method_labels(network: str) -> dict[str, str]:
  """Each method key's label in tables and figures, `network` the evaluated one's name."""
  return {'zero_filled': 'Zero-filling', 'fsmnet': network,
          'fsmnet_dc': f'{network} + data consistency'}


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, dict]]:
  """{method: {metric: {'mean', 'std'}}} over `rows` (population std, as numpy's default)."""
  return {m: {k: {'mean': float(np.mean([r[f'{m}_{k}'] for r in rows])),
                  'std': float(np.std([r[f'{m}_{k}'] for r in rows]))} for k in METRICS}
          for m in methods}


def table1_markdown(summary: dict[str, dict[str, dict]], acceleration: int, title: str,
                    network: str = 'FSMNet') -> str:
  """The paper's Table 1 layout: one row per method, PSNR/SSIM/NMSE as mean ± std."""
  labels = method_labels(network)
  formats = {'psnr': '.2f', 'ssim': '.4f', 'nmse': '.4f'}
  header = ' | '.join(f'{k.upper()} ({acceleration}x)' for k in METRICS)
  lines = [title, '', f'| Method | {header} |', '|---|' + '---|' * len(METRICS)]
  for method, scores in summary.items():
    cells = ' | '.join(f'{scores[k]["mean"]:{formats[k]}} ± {scores[k]["std"]:{formats[k]}}'
                       for k in METRICS)
    lines.append(f'| {labels[method]} | {cells} |')
  return '\n'.join(lines) + '\n'


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot_panel(images: dict[str, np.ndarray], scores: dict[str, float], title: str,
               path: Path, network: str = 'FSMNet') -> None:
  """Reference | zero-filled | the network | ground truth | |network - GT| for one slice."""
  target = images['target']
  scale = max(float(target.max()), 1e-12)
  reference = images['aux']
  reference = (reference - reference.min()) / max(float(np.ptp(reference)), 1e-12)
  columns = [('reference contrast', reference, 1.0),
             (f'zero-filled {scores["zero_filled_psnr"]:.2f} dB', images['zero_filled'], scale),
             (f'{network} {scores["fsmnet_psnr"]:.2f} dB', images['fsmnet'], scale),
             ('ground truth', target, scale)]
  figure = new_figure((17, 3.8))
  axes = figure.subplots(1, 5)
  for axis, (label, image, vmax) in zip(axes, columns):
    axis.imshow(image, cmap='gray', vmin=0, vmax=vmax)
    axis.set_title(label, fontsize=10)
  error_map = axes[4].imshow(np.abs(images['fsmnet'] - target) / scale, cmap='inferno', vmin=0,
                             vmax=ERROR_MAP_MAX)
  axes[4].set_title(f'|{network} - GT| / max(GT)', fontsize=10)
  figure.colorbar(error_map, ax=axes[4], fraction=0.046, pad=0.04)
  for axis in axes:
    axis.axis('off')
  figure.suptitle(title)
  figure.savefig(path, dpi=100, bbox_inches='tight')


def plot_psnr_by_position(rows: list[dict[str, Any]], methods: list[str], path: Path,
                          network: str = 'FSMNet') -> None:
  """PSNR of every slice against its index in the volume, with the mean per index."""
  labels = method_labels(network)
  figure = new_figure((8, 4.5))
  axis = figure.subplots()
  positions = np.array([r['slice'] for r in rows])
  for method in methods:
    values = np.array([r[f'{method}_psnr'] for r in rows])
    points = axis.scatter(positions, values, s=6, alpha=0.3)
    unique = np.unique(positions)
    axis.plot(unique, [values[positions == p].mean() for p in unique],
              color=points.get_facecolor()[0][:3], label=labels[method])
  axis.set_xlabel('slice index in the volume')
  axis.set_ylabel('PSNR (dB, reference convention)')
  axis.grid(alpha=0.3)
  axis.legend()
  figure.savefig(path, dpi=100, bbox_inches='tight')


@dataclasses.dataclass
class SplitScores:
  """What scoring a split gives: one row per slice and per volume, and the panels' images."""
  methods: list[str]
  slices: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  volumes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  panels: list[tuple[pipeline.SliceRecord, dict, dict]] = dataclasses.field(default_factory=list)


def score_split(config: ml_collections.ConfigDict, params: Any, model: FSMNet, split: str,
                with_data_consistency: bool, num_panels: int, precision: str = 'fp32'
                ) -> SplitScores:
  """Scores every slice of `split` (in record order, so volume by volume), sharded over the
  devices of all processes; keeps the images of `num_panels` evenly spaced slices. Each process
  scores its share of the volumes, and every process returns the scores of all."""
  mesh = mesh_lib.make_mesh()
  evaluator = SplitEvaluator(config, mesh, model.apply, split,
                             with_data_consistency=with_data_consistency, with_images=True,
                             whole_volumes=True, compute_dtype=PRECISIONS[precision])
  source = evaluator.source
  ssim_fn = jax.jit(metrics.ssim)
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  scores = SplitScores([m for m in METHODS if m != 'fsmnet_dc' or with_data_consistency])
  panel_keys = set(np.linspace(0, len(source) - 1, min(num_panels, len(source))).round()
                   .astype(int).tolist()) if num_panels else set()
  volume = {'subject': None, 'images': {}}

  def finish_volume():
    if volume['subject'] is not None:
      by_method = _volume_scores(volume['images'], ssim_fn, evaluator.batch_size)
      scores.volumes.append({'subject': volume['subject'],
                             'slices': len(volume['images']['target']),
                             **{f'{m}_{k}': v for m, s in by_method.items() for k, v in s.items()}})

  progress = ProgressBar(evaluator.num_slices, unit='slice')
  for key, slice_metrics, images in evaluator.slices(params):
    record = source.record(key)
    if record.subject != volume['subject']:
      finish_volume()
      volume.update(subject=record.subject, images={})
    for name, image in images.items():
      volume['images'].setdefault(name, []).append(image)
    slice_scores = {f'{m}_{k}': slice_metrics[m][k] for m in scores.methods for k in METRICS}
    scores.slices.append({'subject': record.subject, 'slice': record.index, **slice_scores})
    if record.key in panel_keys:
      scores.panels.append((record, images, slice_scores))
    progress.update(len(scores.slices))
  finish_volume()
  progress.close()
  shares = mesh_lib.gather_objects(scores)  # the processes' shares are in record order
  return SplitScores(scores.methods, *([row for share in shares for row in getattr(share, name)]
                                        for name in ('slices', 'volumes', 'panels')))


def evaluate(config: ml_collections.ConfigDict, params: Any, model: FSMNet,
             out_dir: str | os.PathLike, split: str = 'test', with_data_consistency: bool = False,
             num_panels: int = 4, overwrite: bool = False, checkpoint: str = '',
             precision: str = 'fp32') -> dict[str, Any]:
  """Evaluates `params` on `split`, the network in `precision` (inference.PRECISIONS), and
  writes the report files into `out_dir` (process 0 of a multi-host run: the others score their
  share); returns metrics.json's content. Refuses an existing `out_dir` unless `overwrite`."""
  out_dir = as_path(out_dir)
  dataset = pipeline.underlying_dataset(config.data)
  if with_data_consistency and dataset in pipeline.MULTICOIL:
    shards_of = f' (shards of {dataset!r})' if dataset != config.data.dataset else ''
    raise DataError(f'config.data.dataset={config.data.dataset!r}{shards_of}: multi-coil data; '
                    'data consistency would need the coils\' sensitivities, which are not '
                    'estimated: evaluate without --data_consistency')
  # Process 0 writes, so its answer counts; every process stops alike (one left scoring would
  # wait for the others in a collective).
  refusal = None
  if jax.process_index() == 0:
    try:
      refuse_existing([out_dir], overwrite, folders=True)
    except FileExistsError as e:
      refusal = str(e)
  refusal = mesh_lib.gather_objects(refusal)[0]
  if refusal:
    raise FileExistsError(refusal)
  scores = score_split(config, params, model, split, with_data_consistency, num_panels,
                       precision)
  data = config.data
  network = type(model).__name__
  report = {
      'checkpoint': checkpoint, 'network': network, 'dataset': dataset, 'split': split,
      'acceleration': data.acceleration, 'mask_type': data.mask_type,
      'image_size': data.image_size, 'precision': precision,
      'num_subjects': len(scores.volumes),
      'num_slices': len(scores.slices), 'data_consistency': with_data_consistency,
      'reference_convention': summarize(scores.slices, scores.methods),
      'fastmri_convention': summarize(scores.volumes, scores.methods),
  }
  in_bf16 = ', the network in bf16' if precision == 'bf16' else ''
  title = (f'### {dataset} {split} split, {data.acceleration}x {data.mask_type} mask{in_bf16}: '
           f'{len(scores.volumes)} subjects, {len(scores.slices)} slices')
  table = (table1_markdown(report['reference_convention'], data.acceleration, title, network)
           + '\nPer slice, on the reference convention (uint8, scikit-image defaults).\n\n'
           + table1_markdown(report['fastmri_convention'], data.acceleration,
                             '#### fastMRI convention (per volume, range = max of the volume)',
                             network))

  def write(folder: Path) -> None:
    (folder / 'panels').mkdir(parents=True)
    (folder / 'metrics.json').write_text(json.dumps(report, indent=1))
    (folder / 'table1.md').write_text(table)
    _write_csv(folder / 'slices.csv', scores.slices)
    _write_csv(folder / 'volumes.csv', scores.volumes)
    for record, images, slice_scores in scores.panels:
      plot_panel(images, slice_scores, f'{record.subject}, slice {record.index}',
                 folder / 'panels' / f'{record.subject}_slice{record.index:03d}.png', network)
    plot_psnr_by_position(scores.slices, scores.methods, folder / 'psnr_per_slice.png', network)

  if jax.process_index() == 0:
    write_folder(out_dir, write, overwrite)
    logging.info('wrote %s', out_dir)
  return report
