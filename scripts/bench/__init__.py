"""fsmnet-bench: FSMNet in JAX against its PyTorch twin (torch_port) on this machine.

Each measurement runs in a process of its own, so that its peak memory is its own and neither
framework's thread pools or allocator state leak into the other's. Every process is pinned to
the same CPUs and thread count, loads the same weights (one Flax initialisation, converted
with `torch_port.convert.flax_to_torch`) and the same inputs. Compilation and warm-up are
excluded from the timings (JAX compile time is reported on its own); each figure is the median
of `--repeats` timed runs, with their range.

PyTorch runs twice: with glibc's default malloc, and with the tuned one of
`GLIBC_TUNABLES=...mmap_max=0...` (large activations otherwise go back to the kernel every step).

On a GPU both frameworks run float32 models with TF32 tensor-core convolutions and matmuls: XLA's
default, and PyTorch's for convolutions (its matmuls are set to match); 'tuned' PyTorch also
autotunes its cuDNN convolutions there, as XLA does. `--bf16` adds rows in bfloat16 mixed
precision: JAX's (`config.train.compute_dtype`, `--precision bf16`) and PyTorch's autocast.

  fsmnet-bench                       # the headline table (paper model, 240 px), < 10 min on 2 cores
  fsmnet-bench --json bench.json     # the same, every figure also in a JSON file
  fsmnet-bench --sweep size --sweep batch --sweep devices   # how time grows
  fsmnet-bench --tasks infer --bf16  # inference only, float32 and bfloat16
  fsmnet-bench --tasks infer --profile  # and where each call's time goes, per op class (CPU)
  fsmnet-bench --frameworks jax,jax-xla-conv,torch --profile  # what the CPU convolutions gain
"""

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fsmnet_bench import launch, plan, report
from fsmnet_bench.plan import DEFAULT_FRAMEWORKS, FRAMEWORKS


def main(argv: list[str] | None = None) -> int:
  """Plans, measures and reports; exit code 1 if interrupted or a measurement failed."""
  args, cpus = _parse_args(argv)
  specs = plan.plan(args.quick, args.frameworks, tuple(args.sweep), args.repeats, args.bf16,
                    micro_batched=not args.whole_batch, profile=args.profile)
  if args.sweep and not args.with_main:
    specs = [s for s in specs if s.group != 'main']
  # (The machine's matmul peak and torch's FLOP count stay: the MFU figures need them.)
  specs = [s for s in specs if s.task in args.tasks + ('matmul', 'flops')]
  info = report.machine_info(cpus)
  print(f"fsmnet-bench: {len(specs)} measurements, {len(cpus)} threads on CPUs {cpus}",
        file=sys.stderr, flush=True)
  results = _measure(specs, cpus, info, args.json)
  text = report.format_report(results, report.summarize(results), info)
  if args.json:
    report.write_json(args.json, info, results)
  print(text)
  print(f"\n(total {info['total_s']:.0f} s{', interrupted' if info['interrupted'] else ''})")
  # torch.compile is measured where it works; its failure is a finding, not a benchmark error.
  return 1 if info['interrupted'] or any(
      'error' in r['result'] and r['spec']['framework'] != 'torch-compile' for r in results) else 0


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[int]]:
  """The command line, checked, and the CPUs to pin every process to."""
  parser = argparse.ArgumentParser(
      prog='fsmnet-bench', description=__doc__.split('\n\n')[0],
      epilog='Each measurement runs in its own process; the report is Markdown on stdout.')
  parser.add_argument('--json', type=Path, help='also write every figure to this JSON file')
  parser.add_argument('--repeats', type=int, default=3, help='timed runs per measurement')
  parser.add_argument('--threads', type=int, default=0,
                      help='CPUs to pin every process to (default: all available)')
  parser.add_argument('--frameworks', default=','.join(DEFAULT_FRAMEWORKS),
                      help=f'comma-separated subset of {", ".join(FRAMEWORKS)} (default: '
                           f'{",".join(DEFAULT_FRAMEWORKS)}); jax-xla-conv is JAX with XLA\'s own '
                           'convolutions, the CPU paths of fsmnet_jax.conv off')
  parser.add_argument('--sweep', action='append', default=[], choices=('size', 'batch', 'devices'),
                      help='add a scaling sweep (repeatable); sweeps only, no headline table, '
                           'unless --with-main')
  parser.add_argument('--with-main', action='store_true',
                      help='with --sweep: measure the headline table too')
  parser.add_argument('--bf16', action='store_true',
                      help='add rows in bfloat16 mixed precision, JAX\'s and PyTorch autocast '
                           '(training step and inference of the headline model)')
  parser.add_argument('--whole-batch', action='store_true',
                      help='JAX trains the headline model on the whole batch, as on GPUs (by '
                           'default one micro-batch per image, the faster way on CPU)')
  parser.add_argument('--tasks', default='train,infer',
                      help='comma-separated subset of train, infer: the rows to measure')
  parser.add_argument('--profile', action='store_true',
                      help='trace one more call of each headline measurement and report its '
                           'time per op class (convolutions, FFTs, layout copies, ...; CPU)')
  parser.add_argument('--quick', action='store_true',
                      help='tiny model at 16 px everywhere: checks the machinery in a minute')
  args = parser.parse_args(argv)
  args.frameworks = tuple(f for f in args.frameworks.split(',') if f)
  unknown = [f for f in args.frameworks if f not in FRAMEWORKS]
  if unknown or not args.frameworks:
    parser.error(f'--frameworks: unknown {unknown}; choose from {", ".join(FRAMEWORKS)}')
  args.tasks = tuple(t for t in args.tasks.split(',') if t)
  if not args.tasks or set(args.tasks) - {'train', 'infer'}:
    parser.error(f'--tasks: {",".join(args.tasks)!r}; choose from train, infer')
  if args.repeats < 1:
    parser.error('--repeats must be at least 1')
  available = sorted(os.sched_getaffinity(0))
  if not 0 <= args.threads <= len(available):
    parser.error(f'--threads must be between 1 and the {len(available)} CPUs available')
  cpus = available[:args.threads or len(available)]
  if args.json and args.json.exists() and not args.json.is_file():
    parser.error(f'--json {args.json}: not a file')
  return args, cpus


def _measure(specs: list[plan.Spec], cpus: list[int], info: dict, json_path: Path | None
             ) -> list[dict]:
  """Runs every spec in a worker process, in order; sets info's 'total_s' and 'interrupted'."""
  results: list[dict] = []
  start = time.perf_counter()
  # A run stopped part-way (Ctrl-C, `timeout`, a batch system's SIGTERM) still reports, and
  # its JSON keeps, every measurement it finished; the worker in flight is killed.
  previous_handler = signal.signal(signal.SIGTERM, _interrupt)
  try:
    with tempfile.TemporaryDirectory(prefix='fsmnet-bench-') as tmp:
      weights = {s.model: Path(tmp) / f'{s.model}.msgpack' for s in specs}
      for model in sorted({s.model for s in specs if s.task != 'matmul'}):  # matmuls need none
        launch.save_weights(model, weights[model])
      for spec in specs:
        result = launch.run_worker(spec, weights[spec.model], cpus)
        status = result.get('error') or (
            f"{result['median_s']:.3g} s median" if 'median_s' in result else 'done')
        print(f"  {spec.label}: {status} ({result.get('wall_s', 0):.0f} s)", file=sys.stderr,
              flush=True)
        results.append({'spec': dataclasses.asdict(spec), 'result': result})
        info['total_s'] = time.perf_counter() - start
        if json_path:
          report.write_json(json_path, info, results)
    info['interrupted'] = False
  except KeyboardInterrupt:
    info['interrupted'] = True
    print(f'fsmnet-bench: interrupted after {len(results)} of {len(specs)} measurements',
          file=sys.stderr, flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  info['total_s'] = time.perf_counter() - start
  return results


def _interrupt(signum: int, frame: Any) -> None:
  """SIGTERM as Ctrl-C: stop, kill the worker in flight, report what is finished."""
  raise KeyboardInterrupt(f'signal {signum}')


def run() -> None:
  """The fsmnet-bench console script."""
  sys.exit(main())
