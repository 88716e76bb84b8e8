"""Throughput of the BraTS input pipeline (examples/s) on demo volumes in the BraTS format.

Usage: python scripts/bench_data.py [--image-size 240] [--subjects 16] [--workers 0 2]
The pipeline must outpace the training step: at 240 px a batch-4 step takes seconds on CPU.
"""

import argparse
import tempfile
import time

import numpy as np

from fsmnet_jax.configs import default
from fsmnet_jax.data import pipeline
from fsmnet_jax.data.demo import make_demo_data


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--image-size', type=int, default=240)
  parser.add_argument('--slices', type=int, default=40)
  parser.add_argument('--subjects', type=int, default=16)
  parser.add_argument('--batch-size', type=int, default=4)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as cache:
    make_demo_data(root, num_subjects=args.subjects, num_knee_pairs=1,
                   image_size=args.image_size, num_slices=args.slices)
    config = default.get_config()
    config.data.dataset, config.data.root, config.data.cache_dir = 'demo', root, cache
    config.data.image_size = args.image_size
    config.data.test_fraction = 0.01
    for workers in args.workers:
      config.data.worker_count = workers
      iterator = iter(pipeline.make_loader(config, 'train', args.batch_size))
      next(iterator)  # warm-up: worker start, volume loading
      times = []
      for _ in range(args.batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
      per_batch = float(np.median(times))
      print(f'{args.image_size} px, batch {args.batch_size}, {workers} workers: '
            f'{args.batch_size / per_batch:,.0f} examples/s '
            f'(median {per_batch * 1e3:.1f} ms per batch over {args.batches})')


if __name__ == '__main__':
  main()
