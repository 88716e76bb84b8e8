"""Data-parallel scaling, projected from the compiled train step: the bytes it all-reduces per
step (read from the HLO of the step compiled for 8 host devices) and a single-device step time
give the step time and efficiency on N devices at a stated link bandwidth.

Usage: python scripts/scaling.py [--config configs/brats_4x.py] [--config.key=value ...]
  [--platform cuda|rocm|tpu|cpu] --step-ms 40 [--step-ms 120 ...]
The step is compiled with the convolutions of --platform (default cuda; rocm and tpu take the
same ones): XLA:CPU's hand-written convolution gradients (fsmnet_jax/conv.py) reduce
activation-sized tensors across devices, the native convolutions of GPUs and TPUs only the
gradients.
Model (a ring all-reduce, not overlapped with compute: a lower bound on efficiency):
  t(N) = t_1 + 2 (N - 1) / N * bytes / bandwidth,  efficiency = t_1 / t(N)
with the per-device batch kept (weak scaling), t_1 the step time of one device.
"""

import argparse
import os
import re
import sys
from pathlib import Path

HOST_DEVICES = 8
# Bandwidth per device, GB/s, as the vendors state it (NVLink: one direction; TPU: the chip's
# interchip interconnect, of which a ring over a torus uses a share: optimistic there).
LINKS = {
    'GPU, NVLink 4 in a node (H100 SXM, 900 GB/s both ways)': 450.0,
    'GPU, InfiniBand NDR, 400 Gb/s per GPU': 50.0,
    'GPU, 100 Gb/s Ethernet per node of 8 GPUs': 1.5625,
    'TPU v5e, ICI 1,600 Gb/s per chip': 200.0,
    'TPU v5p, ICI 4,800 Gb/s per chip': 600.0,
}
DEVICE_COUNTS = (8, 16, 32, 64, 128, 256)
_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's8': 1, 'u8': 1,
          'pred': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([\d,]*)\]')


def allreduce_bytes(hlo_text: str) -> int:
  """Bytes all-reduced by one run of the HLO module `hlo_text` (every all-reduce's result)."""
  total = 0
  for line in hlo_text.splitlines():
    if ' all-reduce(' not in line and ' all-reduce-start(' not in line:
      continue
    result_type = line.split(' = ', 1)[1].split(' all-reduce', 1)[0]
    for dtype, dims in _ARRAY.findall(result_type):
      count = 1
      for dim in filter(None, dims.split(',')):
        count *= int(dim)
      total += count * _BYTES[dtype]
  return total


def compiled_step_allreduce(config_file: Path, overrides: list[str], platform: str
                            ) -> tuple[int, int]:
  """(bytes all-reduced per step, parameters) of the train step compiled for HOST_DEVICES,
  with the convolutions of `platform`."""
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + f' --xla_force_host_platform_device_count={HOST_DEVICES}')
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from fsmnet_jax import mesh as mesh_lib, train  # pylint: disable=import-outside-toplevel
  from fsmnet_jax.cli.common import (  # pylint: disable=import-outside-toplevel
      load_config_file, override_config)
  from fsmnet_jax.model import build_model  # pylint: disable=import-outside-toplevel
  config = override_config(load_config_file(config_file), overrides)
  config.train.batch_size = HOST_DEVICES * max(1, config.train.batch_size // HOST_DEVICES)
  mesh = train.make_mesh(config)
  state = train.abstract_train_state(config, build_model(config), mesh)
  size = (config.train.batch_size, config.data.image_size, config.data.image_size, 1)
  batch = {key: jax.ShapeDtypeStruct(size, jnp.float32, sharding=mesh_lib.rows(mesh))
           for key in train.TRAIN_KEYS}
  compiled = train.jit_train_step(config, mesh, state, platform).lower(state, batch).compile()
  params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))
  return allreduce_bytes(compiled.as_text()), params


def projection(step_seconds: float, allreduce: int, bandwidth_gb_s: float,
               devices: int) -> tuple[float, float]:
  """(step time in s, efficiency) on `devices` devices."""
  communication = 2 * (devices - 1) / devices * allreduce / (bandwidth_gb_s * 1e9)
  step = step_seconds + communication
  return step, step_seconds / step


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--config', type=Path,
                      default=Path(__file__).resolve().parents[1] / 'configs/brats_4x.py')
  parser.add_argument('--platform', choices=('cuda', 'rocm', 'tpu', 'cpu'), default='cuda',
                      help="whose convolutions the step takes (default cuda)")
  parser.add_argument('--step-ms', type=float, action='append', required=True,
                      help='a single-device step time (ms) to project from; repeatable')
  args, overrides = parser.parse_known_args()
  allreduce, params = compiled_step_allreduce(args.config, overrides, args.platform)
  print(f'{args.config.name}: {params:,} parameters; the step with {args.platform} '
        f'convolutions all-reduces {allreduce / 1e6:.2f} MB per step '
        f'({allreduce / (4 * params):.3f} x the float32 parameters)\n')
  header = ' | '.join(f'{n}' for n in DEVICE_COUNTS)
  print(f'| link (GB/s) | t_1 (ms) | {header} |\n|---|---|' + '---|' * len(DEVICE_COUNTS))
  for link, bandwidth in LINKS.items():
    for step_ms in args.step_ms:
      cells = []
      for devices in DEVICE_COUNTS:
        step, efficiency = projection(step_ms / 1e3, allreduce, bandwidth, devices)
        cells.append(f'{step * 1e3:.1f} ms, {efficiency:.0%}')
      print(f'| {link} ({bandwidth:g}) | {step_ms:g} | {" | ".join(cells)} |')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
