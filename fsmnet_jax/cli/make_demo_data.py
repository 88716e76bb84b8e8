"""fsmnet-make-demo-data: writes the synthetic demo data set of `fsmnet_jax.data.demo`."""

import argparse
import sys
from pathlib import Path

from fsmnet_jax.cli.common import USER_ERRORS, int_at_least, run_command
from fsmnet_jax.data import brain_template, demo
from fsmnet_jax.data.volumes import MIN_SLICE_SIZE


def _make(args: argparse.Namespace) -> int:
  out = demo.make_demo_data(args.out_dir, args.seed, args.subjects, args.knee_pairs,
                            args.image_size, args.slices, args.anatomy, args.ixi_subjects,
                            args.multicoil_pairs, args.m4raw_subjects)
  print(f'wrote to {out}:\n'
        f'  brats/              {args.subjects} BraTS-layout subjects ({args.anatomy})\n'
        f'  fastmri/            {args.knee_pairs} single-coil knee PD/PDFS pairs, pairs.csv\n'
        f'  ixi/                {args.ixi_subjects} IXI subjects (T1, T2, PD)\n'
        f'  fastmri_multicoil/  {args.multicoil_pairs} multi-coil knee PD/PDFS pairs, pairs.csv\n'
        f'  m4raw/              {args.m4raw_subjects} M4Raw subjects (T1, T2, FLAIR)')
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='fsmnet-make-demo-data', description=demo.__doc__)
  parser.add_argument('out_dir', type=Path, help='new (or empty) folder to write into')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--subjects', type=int_at_least(0), default=8, help='BraTS-layout subjects')
  parser.add_argument('--knee-pairs', type=int_at_least(0), default=4,
                      help='fastMRI-format single-coil PD/PDFS pairs')
  parser.add_argument('--ixi-subjects', type=int_at_least(0), default=4, help='IXI-layout subjects')
  parser.add_argument('--multicoil-pairs', type=int_at_least(0), default=2,
                      help='fastMRI-format multi-coil PD/PDFS pairs')
  parser.add_argument('--m4raw-subjects', type=int_at_least(0), default=2,
                      help='M4Raw-layout subjects (a quarter, at least one, in multicoil_val)')
  parser.add_argument('--image-size', type=int_at_least(MIN_SLICE_SIZE), default=64,
                      help='in-plane size of every volume')
  parser.add_argument('--slices', type=int_at_least(1), default=16, help='slices per volume')
  parser.add_argument('--anatomy', choices=demo.ANATOMIES, default='phantom',
                      help="the brain subjects: ellipsoid phantoms, or 'brain': the ICBM152 "
                           'template deformed per subject (needs the brain extra, nilearn)')
  parser.add_argument('--debug', action='store_true', help='show tracebacks of errors')
  return run_command('fsmnet-make-demo-data', parser, _make, argv,
                     USER_ERRORS + (brain_template.MissingExtraError,))


if __name__ == '__main__':
  sys.exit(main())
