"""Throughput of the input pipeline of every data set (examples/s), on demo files in each data
set's own layout and at its usual size, read from the files and from prepared shards
(fsmnet-prepare-data), with what each keeps on disk per slice.

Usage: python scripts/bench_data.py [--datasets brats ixi ...] [--workers 0 2]
  [--image-size N] (one size for all; default: each data set's own, below) [--bucket]
--bucket also reads the files and the shards from a Cloud Storage bucket served on this machine
(scripts/gcs_emulator.py).
The pipeline must outpace the training step it feeds: a batch-4 step of the paper-size model
takes seconds on a CPU at 240 px (docs/benchmarks.md), a fraction of a second on a GPU.
"""

import argparse
import atexit
import tempfile
import time
from pathlib import Path

import numpy as np

import gcs_emulator
from fsmnet_jax.configs import default
from fsmnet_jax.data import demo, pipeline
from fsmnet_jax.files import as_path, upload

# Each data set at its usual size (the demo layouts' settings: demo.LAYOUT_SETTINGS).
DATASETS = {'brats': 240, 'ixi': 256, 'ixi_t1': 256, 'nifti_pairs': 240, 'fastmri': 320,
            'fastmri_multicoil': 320, 'm4raw': 256}
KNEE_COILS = 15  # fastMRI's multi-coil knee files: commonly 15
VOLUMES = 4  # subjects or pairs per data set


def write_files(root: Path, dataset: str, size: int, slices: int) -> None:
  """The demo files `dataset` reads, VOLUMES of them, at `size`."""
  rng = np.random.default_rng(0)
  if dataset in ('brats', 'nifti_pairs'):
    demo.write_brats(root / 'brats', VOLUMES, size, slices, rng)
  elif dataset in ('ixi', 'ixi_t1'):
    demo.write_ixi(root / 'ixi', VOLUMES, size, slices, rng)
  elif dataset == 'fastmri':
    demo.write_fastmri(root / 'fastmri', VOLUMES, size, slices, rng)
  elif dataset == 'fastmri_multicoil':
    demo.write_fastmri_multicoil(root / 'fastmri_multicoil', VOLUMES, size, slices, rng,
                                 coils=KNEE_COILS)
  elif dataset == 'm4raw':
    demo.write_m4raw(root / 'm4raw', VOLUMES + 1, size, slices, rng)  # VOLUMES train
  else:
    raise ValueError(f'{dataset}: no demo files for it')


def _megabytes(folder: Path) -> float:
  return sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 2**20


def _in_bucket(settings: dict[str, str], local_root: Path, url: str) -> dict[str, str]:
  """`settings` (config.data) with the paths under `local_root` moved to `url`."""
  return {key: value.replace(str(local_root), url) if key.endswith(('root', 'pairs')) else value
          for key, value in settings.items()}


def measure(dataset: str, size: int, args: argparse.Namespace) -> None:
  with tempfile.TemporaryDirectory() as folder:
    root = Path(folder)
    write_files(root / 'data', dataset, size, args.slices)
    config = default.get_config()
    config.data.update(demo.layout_settings(root / 'data', dataset))
    config.data.update(image_size=size, test_fraction=0.01, cache_dir=str(root / 'cache'))
    manifest = pipeline.prepare(config, root / 'shards')
    slices = sum(table['slices'] for table in manifest['splits'].values())
    prepared = config.copy_and_resolve_references()
    prepared.data.update(dataset='prepared', root=str(root / 'shards'))
    # The files are read on every host, and NIfTI volumes decoded into each host's cache; the
    # shards are written once and read where they are.
    kept = {'files': f'{_megabytes(root / "data") / slices:.2f} + '
                     f'{_megabytes(root / "cache") / slices:.2f} cache',
            'shards': f'{_megabytes(root / "shards") / slices:.2f}'}
    sources = [('files', config), ('shards', prepared)]
    if args.bucket:
      url = f'{args.bucket}/{dataset}'
      for folder in ('data', 'shards'):
        upload(root / folder, as_path(f'{url}/{folder}'))
      in_bucket = config.copy_and_resolve_references()
      in_bucket.data.update(_in_bucket(demo.layout_settings(root / 'data', dataset),
                                       root / 'data', f'{url}/data'))
      in_bucket.data.cache_dir = str(root / 'bucket_cache')
      # As prepare() did for the local files: every volume decoded into the cache once.
      for _ in pipeline.make_loader(in_bucket, 'train', args.batch_size, num_epochs=1):
        pass
      shards_in_bucket = prepared.copy_and_resolve_references()
      shards_in_bucket.data.root = f'{url}/shards'
      kept['files in a bucket'] = kept['files'].replace('cache', 'cache (local)')
      kept['shards in a bucket'] = kept['shards']
      sources += [('files in a bucket', in_bucket), ('shards in a bucket', shards_in_bucket)]
    for source, source_config in sources:
      for workers in args.workers:
        source_config.data.worker_count = workers
        iterator = iter(pipeline.make_loader(source_config, 'train', args.batch_size))
        next(iterator)  # warm-up: worker start (prepare() filled the decode cache)
        # The whole stretch, not a median of single batches: workers prefetch, and a median
        # would time taking ready batches out of their buffer.
        start = time.perf_counter()
        for _ in range(args.batches):
          next(iterator)
        per_batch = (time.perf_counter() - start) / args.batches
        print(f'| {dataset} | {size} | {source} | {kept[source]} | {workers} | '
              f'{args.batch_size / per_batch:,.0f} | {per_batch * 1e3:.1f} |', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--datasets', nargs='+', choices=list(DATASETS), default=list(DATASETS))
  parser.add_argument('--image-size', type=int, default=0, help='0: each data set its own')
  parser.add_argument('--slices', type=int, default=16, help='per volume')
  parser.add_argument('--batch-size', type=int, default=4)
  parser.add_argument('--batches', type=int, default=60)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  parser.add_argument('--bucket', action='store_true',
                      help='also read the files and shards from a bucket served on this machine')
  args = parser.parse_args()
  if args.bucket:
    server, url = gcs_emulator.start('bench')
    # At exit, once gcsfs's read-ahead threads are done (they outlive the files they read).
    atexit.register(server.terminate)
    gcs_emulator.use_in_this_process(url)
    args.bucket = 'gs://bench'

  print(f'batch {args.batch_size}, {args.batches} batches after one warm-up batch\n')
  print('| data set | px | read from | MB per slice on disk | workers | examples/s | '
        'ms per batch |\n|---|---|---|---|---|---|---|')
  for dataset in args.datasets:
    measure(dataset, args.image_size or DATASETS[dataset], args)


if __name__ == '__main__':
  main()
