"""Where one call's time goes, per op class, in both frameworks (fsmnet-bench --profile).

JAX: a `jax.profiler` trace of one call of the compiled program. Each traced XLA op is
classified from the optimized HLO (the opcodes it fuses, the named scopes of its ops) and its
time is attributed as wall-clock time: where ops overlap on the runtime's threads, each gets
an equal share. PyTorch: `torch.profiler`'s self time of each aten op of one call (its ops run
one after another, each on all threads). What neither accounts for, the call's wall-clock time
minus the ops', is 'other (runtime, idle threads)'. The costliest single ops are listed too.
"""
# pylint: disable=import-outside-toplevel

import collections
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Report order.
OP_CLASSES = (
    'convolution', 'convolution, input gradient', 'convolution, kernel gradient',
    'convolution, gradients', 'depthwise convolution', 'attention products', 'FFT',
    'phase: atan2, sin, cos', 'layout: transpose, copy, pad, concatenate',
    'element-wise, reductions', 'other (runtime, idle threads)')
OTHER = OP_CLASSES[-1]

_LAYOUT_OPCODES = {'transpose', 'copy', 'bitcast', 'reshape', 'slice', 'dynamic-slice', 'pad',
                   'concatenate', 'broadcast', 'parameter', 'constant', 'tuple',
                   'get-tuple-element', 'real', 'imag', 'complex', 'reverse',
                   'dynamic-update-slice'}
_PHASE_OPCODES = {'atan2', 'sine', 'cosine'}
# A pseudo-opcode: a convolution that is a kernel gradient by its shapes (XLA's own kernel
# gradients lose their metadata when XLA:CPU rewrites them).
KERNEL_GRADIENT = 'convolution(kernel gradient)'
_CONVOLUTION = re.compile(r'= \w+\[([\d,]*)\]\S* convolution\(.*window=\{size=([\dx]+).*'
                          r'dim_labels=\w+->(\w+)')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{$')


def classify_xla(opcodes: set[str], op_names: str) -> str:
  """The op class of an XLA op (or fusion) that runs `opcodes`, whose ops' metadata op_names
  are `op_names` (fsmnet_jax.conv names its gradient and depthwise scopes)."""
  if 'depthwise_conv' in op_names:  # before 'convolution': XLA's own depthwise ones too
    return 'depthwise convolution'
  if KERNEL_GRADIENT in opcodes or 'convolution' in opcodes and 'conv_kernel_gradient' in op_names:
    return 'convolution, kernel gradient'
  if 'convolution' in opcodes:
    # XLA's own input gradients (the path of GPUs and TPUs) are in transposed scopes.
    gradient = 'conv_input_gradient' in op_names or 'transpose(' in op_names
    return 'convolution, input gradient' if gradient else 'convolution'
  if 'fft' in opcodes:
    return 'FFT'
  if 'dot' in opcodes:
    return 'attention products'  # the model's only matmuls (its 1x1 layers are convolutions)
  if opcodes & _PHASE_OPCODES:
    return 'phase: atan2, sin, cos'
  if opcodes <= _LAYOUT_OPCODES:
    return 'layout: transpose, copy, pad, concatenate'
  return 'element-wise, reductions'


def _xla_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """(op class, op_name of its metadata) of every instruction of an optimized HLO module, by
  name; a fusion (or a call) is classified by the computation it runs."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = bodies.setdefault(header.group(1), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)

  def op_names(lines: list[str]) -> list[str]:
    return re.findall(r'op_name="([^"]*)"', '\n'.join(lines))

  instructions = {}
  for lines in bodies.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if not match:
        continue
      callee = re.search(r'calls=%([\w.\-]+)', line)
      body = bodies.get(callee.group(1), []) if callee else [line]
      opcodes = {KERNEL_GRADIENT if _is_kernel_gradient(op) else m.group(2)
                 for op in body if (m := _INSTRUCTION.match(op))} or {match.group(2)}
      instructions[match.group(1)] = (classify_xla(opcodes, ' '.join(op_names(body))),
                                      (op_names([line]) or [''])[0])
  return instructions


def _is_kernel_gradient(instruction: str) -> bool:
  """Whether an HLO instruction is the kernel gradient of a 'same' convolution: a convolution
  whose window (the image, slid over the kernel's positions) is wider than its output."""
  match = _CONVOLUTION.search(instruction)
  if not match:
    return False
  shape = [int(d) for d in match.group(1).split(',')]
  window = [int(d) for d in match.group(2).split('x')]
  output_spatial = [shape[match.group(3).index(str(axis))] for axis in range(len(window))]
  return any(w > s for w, s in zip(window, output_spatial))


def wall_shares(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
  """Seconds of wall-clock time per key for (start_ns, end_ns, key) intervals: a stretch where
  n intervals overlap counts 1/n of its length for each."""
  changes = sorted([(start, 1, key) for start, _, key in intervals]
                   + [(end, -1, key) for _, end, key in intervals])
  running: collections.Counter = collections.Counter()
  seconds: dict[str, float] = collections.defaultdict(float)
  for (left, step, key), (right, _, _) in zip(changes, changes[1:] + changes[-1:]):
    running[key] += step
    if not running[key]:
      del running[key]
    total = sum(running.values())
    for running_key, count in running.items():
      seconds[running_key] += (right - left) * count / total / 1e9
  return dict(seconds)


def jax_profile(compiled: Any, run: Callable[[], Any]) -> dict:
  """Where one call of `run`, which calls the jitted `compiled`, spends its time: seconds per
  op class ('op_seconds') and the costliest XLA ops ('top_ops')."""
  import jax
  instructions = _xla_instructions(compiled.as_text())
  with tempfile.TemporaryDirectory(prefix='fsmnet-profile-') as folder:
    jax.profiler.start_trace(folder)
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    trace = jax.profiler.ProfileData.from_file(str(next(Path(folder).rglob('*.xplane.pb'))))
  intervals = []
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        # XLA's ops run on the runtime's threads, not on Python's; an op's parallel tasks
        # (XNNPACK's, Eigen's) are not traced separately: its event spans them.
        if event.name in instructions and line.name != 'python':
          intervals.append((event.start_ns, event.end_ns, event.name))
  ops = [{'seconds': seconds, 'class': instructions[op][0], 'op': op,
          'scope': instructions[op][1]} for op, seconds in wall_shares(intervals).items()]
  return _profile(ops, wall)


def torch_profile(run: Callable[[], Any]) -> dict:
  """Where one call of `run` (PyTorch on the CPU) spends its time: seconds per op class
  ('op_seconds') and the costliest aten ops, by input shapes ('top_ops')."""
  import torch
  activities = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=activities, record_shapes=True) as profile:
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
  seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
  classes = {}
  for event in profile.events():
    if event.name.startswith('aten::') and event.self_cpu_time_total > 0:
      key = (event.name, str(event.input_shapes))
      seconds[key] += event.self_cpu_time_total / 1e6
      classes[key] = classify_aten(event.name, event.input_shapes)
  ops = [{'seconds': s, 'class': classes[key], 'op': key[0], 'shapes': key[1]}
         for key, s in seconds.items()]
  return _profile(ops, wall)


def classify_aten(name: str, input_shapes: list) -> str:
  """The op class of an aten op. A convolution is depthwise when its weight (the last 4-d
  input) is (C, 1, k, k) and its activations (the others) have C > 1 channels."""
  op = name.removeprefix('aten::')
  if 'conv' in op:
    shapes = [s for s in input_shapes if isinstance(s, list) and len(s) == 4]
    if len(shapes) >= 2 and shapes[-1][1] == 1 and all(
        s[1] == shapes[-1][0] > 1 for s in shapes[:-1]):
      return 'depthwise convolution'
    return 'convolution, gradients' if 'backward' in op else 'convolution'
  if 'fft' in op:
    return 'FFT'
  if op in ('bmm', 'mm', 'matmul', 'addmm', 'baddbmm'):
    return 'attention products'
  if op in ('angle', 'atan2', 'sin', 'cos'):
    return 'phase: atan2, sin, cos'
  if op in ('copy_', 'cat', 'clone', 'contiguous', 'pixel_shuffle', 'pixel_unshuffle',
            'constant_pad_nd', 'complex', 'view_as_real', 'view_as_complex', 'flip'):
    return 'layout: transpose, copy, pad, concatenate'
  return 'element-wise, reductions'


def _profile(ops: list[dict], wall: float, top: int = 20) -> dict:
  """Seconds per op class of `ops` (in report order; the rest of the call's `wall` time is
  OTHER) and the `top` costliest ops."""
  seconds: dict[str, float] = collections.defaultdict(float)
  for op in ops:
    seconds[op['class']] += op['seconds']
  seconds[OTHER] = max(0.0, wall - sum(seconds.values()))
  return {'op_seconds': {name: seconds[name] for name in OP_CLASSES if name in seconds},
          'top_ops': sorted(ops, key=lambda op: -op['seconds'])[:top]}
