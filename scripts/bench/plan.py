"""What fsmnet-bench measures: the frameworks, the models and the list of measurements."""

import dataclasses

from fsmnet_jax.configs import default, tiny

TUNED_MALLOC = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736'
# FSMNet attributes, from the configs: 'paper' is the reference's network.
MODELS = {name: config.get_config().model.to_dict()
          for name, config in (('paper', default), ('tiny', tiny))}
FRAMEWORKS = {  # name -> (library, glibc tunables, torch.compile)
    'jax': ('jax', '', False),
    'jax-xla-conv': ('jax', '', False),
    'torch': ('torch', '', False),
    'torch-tuned': ('torch', TUNED_MALLOC, False),
    'torch-compile': ('torch', TUNED_MALLOC, True),
}
# JAX with XLA's own convolutions on every device (those GPUs and TPUs run): fsmnet_jax.conv's
# CPU paths switched off, to measure what they gain on this CPU.
XLA_CONVOLUTIONS = ('jax-xla-conv',)
# What a plain run measures: the CPU paths' gain is measured on request (--frameworks).
DEFAULT_FRAMEWORKS = ('jax', 'torch', 'torch-tuned', 'torch-compile')
FRAMEWORK_TITLES = {'jax': 'JAX (jit)', 'jax-xla-conv': "JAX, XLA's convolutions",
                    'torch': 'PyTorch eager',
                    'torch-tuned': 'PyTorch eager, tuned',
                    'torch-compile': 'torch.compile, tuned'}


@dataclasses.dataclass(frozen=True)
class Spec:
  """One measurement, run in a process of its own.

  `task` is 'train' (forward + backward + clipping + AdamW), 'infer', 'matmul' (this machine's
  peak) or 'flops' (torch's FLOP count).
  """
  framework: str
  task: str
  model: str = 'paper'
  size: int = 240
  batch: int = 1
  devices: int = 1  # forced host devices (JAX on CPU; data-parallel over them)
  # Compute dtype of convolutions and matmuls: 'bfloat16' is JAX's mixed precision (as
  # config.train.compute_dtype, --precision bf16) and PyTorch's autocast.
  dtype: str = 'float32'
  micro_batches: int = 1  # JAX training step: config.train.grad_accum_steps
  repeats: int = 3
  warmup: int = 1
  group: str = 'main'
  profile: bool = False  # also trace one more call: its time per op class (profile.py)

  @property
  def label(self) -> str:
    """The measurement in words, for the progress log."""
    if self.task in ('matmul', 'flops'):
      return f'{self.task} {self.framework}'
    devices = f', {self.devices} devices' if self.devices > 1 else ''
    dtype = f', {self.dtype}' if self.dtype != 'float32' else ''
    micro = f', {self.micro_batches} micro-batches' if self.micro_batches > 1 else ''
    return (f'{self.task} {self.model} {self.size}px batch {self.batch}{micro}{devices}{dtype} '
            f'[{self.framework}]')


def plan(quick: bool = False, frameworks: tuple[str, ...] = DEFAULT_FRAMEWORKS,
         sweeps: tuple[str, ...] = (), repeats: int = 3, bf16: bool = False,
         micro_batched: bool = True, profile: bool = False) -> list[Spec]:
  """The measurements of one run.

  Args:
    quick: the tiny model at 16 px only: a smoke run of the whole machinery in about a minute.
    frameworks: keys of FRAMEWORKS.
    sweeps: 'size', 'batch' and/or 'devices': how time grows with each.
    repeats: timed runs per measurement.
    bf16: adds the headline model's training step and inference in bfloat16 mixed precision
      (JAX's; PyTorch's autocast).
    micro_batched: JAX trains the headline model one image at a time, as README recommends on
      CPU (accelerators want the whole batch).
    profile: the headline table's measurements also report their time per op class.

  Returns:
    The headline table's measurements (group 'main'), then the sweeps'.
  """
  big_model, big_size = ('tiny', 16) if quick else ('paper', 240)
  specs = []
  for framework in frameworks:
    if quick:
      rows = [('train', 'tiny', 16, 2), ('infer', 'tiny', 16, 1), ('infer', 'tiny', 16, 2)]
    else:
      rows = [('train', 'paper', 240, 4), ('train', 'tiny', 64, 4), ('infer', 'paper', 240, 1),
              ('infer', 'paper', 240, 8)]
    if FRAMEWORKS[framework][2] and not quick:
      # inductor's C++ compile of the paper model would take most of the time budget here
      rows = [row for row in rows if row[1] == 'tiny']
    rows = [(*row, 'float32') for row in rows]
    if bf16:
      rows += [(task, model, size, batch, 'bfloat16') for task, model, size, batch, _ in rows
               if model == big_model and (task == 'infer' or batch > 1)]
    # The paper model's batched calls take 10-40 s each here: one timed run fewer keeps the
    # whole default run under 10 minutes on 2 cores. On CPU one micro-batch per image is the
    # same gradient ~1.5x faster, in a quarter of the memory (batch 4, 240 px). Not with XLA's
    # own convolutions: inside the accumulation loop their gradients run on a naive kernel
    # (docs/xla_cpu_convolutions.md), so jax-xla-conv trains whole batches, as on GPUs.
    micro = lambda task, model, batch: batch if micro_batched and (framework, task, model) == (
        'jax', 'train', big_model) else 1
    specs += [Spec(framework, task, model, size, batch, dtype=dtype,
                   repeats=max(2, repeats - 1) if model == 'paper' and batch > 1 else repeats,
                   micro_batches=micro(task, model, batch), profile=profile)
              for task, model, size, batch, dtype in rows]
  for library in sorted({FRAMEWORKS[f][0] for f in frameworks}):
    specs.append(Spec(library if library == 'jax' else 'torch-tuned', 'matmul'))
  if any(FRAMEWORKS[f][0] == 'torch' for f in frameworks):
    specs.append(Spec('torch-tuned', 'flops', big_model, big_size, 1))

  sweep_model = 'tiny' if quick else 'paper'
  sizes = (32, 64) if quick else (128, 240, 320, 480)
  batches = (1, 2) if quick else (1, 2, 4, 8, 16)
  sweep_frameworks = [f for f in ('jax', 'torch-tuned') if f in frameworks]
  sweep_repeats = max(1, repeats - 1)
  for sweep in sweeps:
    if sweep == 'size':
      specs += [Spec(f, task, sweep_model, size, 1, repeats=sweep_repeats, group='size')
                for size in sizes for task in ('infer', 'train') for f in sweep_frameworks]
    elif sweep == 'batch':
      specs += [Spec(f, 'train', sweep_model, 32 if quick else 128, batch,
                     repeats=sweep_repeats, group='batch')
                for batch in batches for f in sweep_frameworks]
    elif sweep == 'devices':
      specs += [Spec('jax', 'train', sweep_model, 32 if quick else 128, 8, devices=devices,
                     repeats=sweep_repeats, group='devices')
                for devices in ((1, 2) if quick else (1, 2, 4, 8))]
    else:
      raise ValueError(f'unknown sweep {sweep!r}: use size, batch or devices')
  return specs
