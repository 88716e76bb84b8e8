"""Prints and writes (WORKDIR/report.md) the last evaluation of a training run: PSNR/SSIM/NMSE
of FSMNet next to zero-filling, on the test split, as `fsmnet-train` logged them."""

import argparse
import json
import sys
from pathlib import Path

ROWS = (('FSMNet', 'eval_'), ('zero-filling', 'eval_zero_filled_'))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('workdir', type=Path)
  workdir = parser.parse_args().workdir
  metrics_file = workdir / 'metrics.jsonl'
  if not metrics_file.is_file():
    print(f'demo_report: error: {metrics_file}: no such file; has the run started?',
          file=sys.stderr)
    return 2
  evaluations = [json.loads(line) for line in metrics_file.read_text().splitlines()
                 if '"eval_psnr"' in line]
  if not evaluations:
    print(f'demo_report: error: {metrics_file}: no evaluation yet', file=sys.stderr)
    return 2
  last = evaluations[-1]
  config = json.loads((workdir / 'config.json').read_text())
  data = config['data']
  lines = [f'# FSMNet demo: {data["dataset"]} {data["acceleration"]}x, {data["image_size"]} px, '
           f'step {last["step"]}',
           '',
           '| method | PSNR (dB) | SSIM | NMSE |',
           '|---|---|---|---|']
  lines += [f'| {name} | {last[prefix + "psnr"]:.2f} | {last[prefix + "ssim"]:.4f} | '
            f'{last[prefix + "nmse"]:.4f} |' for name, prefix in ROWS]
  report = '\n'.join(lines) + '\n'
  (workdir / 'report.md').write_text(report)
  print(report + f'\n(written to {workdir / "report.md"})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
