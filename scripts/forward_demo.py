"""Runs the paper-size FSMNet forward pass on synthetic images and prints shapes and timings."""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fsmnet_jax.model import FSMNet, count_params, init_variables


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--image-size', type=int, default=240)
  parser.add_argument('--batch-size', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  model = FSMNet()
  start = time.perf_counter()
  variables = init_variables(model, jax.random.key(0))
  print(f'FSMNet(): {count_params(variables):,} parameters '
        f'(initialised in {time.perf_counter() - start:.1f} s)')

  shape = (args.batch_size, args.image_size, args.image_size, 1)
  target_under, aux = jax.random.uniform(jax.random.key(1), (2, *shape))
  forward = jax.jit(model.apply)
  start = time.perf_counter()
  compiled = forward.lower(variables, target_under, aux).compile()
  print(f'compiled forward for inputs {shape} in {time.perf_counter() - start:.1f} s')

  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled(variables, target_under, aux))
    times.append(time.perf_counter() - start)
  for name, value in outputs.items():
    print(f'{name}: shape {value.shape}, dtype {value.dtype}, '
          f'finite {bool(jnp.isfinite(value).all())}')
  print(f'forward: median {np.median(times):.2f} s over {args.repeats} runs '
        f'({jax.devices()[0].platform}, {jax.device_count()} device(s))')


if __name__ == '__main__':
  main()
