"""fsmnet-reconstruct: whole scans in, reconstructions out, with a trained FSMNet.

The model and data settings come from `--config` (a configs/*.py file) if given, else from the
training run's config.json when the checkpoint is a workdir or one of its steps, else from the
defaults (configs/default.py for NIfTI, configs/fastmri_4x.py for k-space) with the model
read off the weights.
"""

import argparse
import sys

from fsmnet_jax import inference, reconstruct
from fsmnet_jax.cli.common import add_model_arguments, int_at_least, load_model, run_command
from fsmnet_jax.files import as_path


def _reconstruct(args: argparse.Namespace) -> int:
  from_kspace = args.kspace is not None
  if from_kspace == (args.t2 is not None):
    raise ValueError('give either --t1 and --t2 (NIfTI) or --kspace and --reference (h5)')
  if (args.t1 is not None) == from_kspace or (args.reference is not None) != from_kspace:
    raise ValueError('--t2 goes with --t1, --kspace with --reference')
  if args.align_by_headers and from_kspace:
    raise ValueError('--align-by-headers aligns a NIfTI --t1 to --t2; k-space pairs are slices '
                     'of one session')
  inference.enable_compilation_cache()
  config, params, model = load_model(args.checkpoint, args.config,
                                     'fastmri_4x' if from_kspace else 'default')
  reconstructor = inference.Reconstructor(model, params, args.batch_size, args.precision)
  settings = dict(out=args.out, acceleration=args.acceleration, seed=args.seed,
                  with_data_consistency=args.data_consistency, overwrite=args.overwrite)
  if from_kspace:
    result = reconstruct.reconstruct_kspace(reconstructor, config.data, args.kspace,
                                            args.reference, **settings)
  else:
    result = reconstruct.reconstruct_nifti(reconstructor, config.data, args.t1, args.t2,
                                           align_by_headers=args.align_by_headers, **settings)
  print(f'wrote {args.out} ({len(result.image)} slices of {result.image.shape[1]}x'
        f'{result.image.shape[2]}, {result.mask.size / result.mask.sum():.2f}x sampling) and '
        f'{reconstruct.mask_path(args.out)}')
  if result.psnr:
    print(f'against the fully-sampled input (fastMRI convention): zero-filled '
          f'{result.psnr["zero_filled"]:.2f} dB, FSMNet'
          f'{" + data consistency" if args.data_consistency else ""} '
          f'{result.psnr["fsmnet"]:.2f} dB')
  return 0


def main(argv: list[str] | None = None) -> int:
  """fsmnet-reconstruct: reconstructs whole scans with a trained FSMNet."""
  parser = argparse.ArgumentParser(
      prog='fsmnet-reconstruct',
      description='Reconstruct a whole scan with a trained FSMNet. From NIfTI images: '
                  '--t1 T1 --t2 T2 --acceleration N simulates the undersampling of T2 with a '
                  'seeded mask. From k-space: --kspace a fastMRI-format .h5, single- or multi-coil '
                  '(the output is then the root-sum-of-squares image; its "mask", '
                  'else its non-zero lines, else --acceleration simulates one) and --reference '
                  'the fully-sampled reference contrast .h5. The mask used is saved as '
                  'OUT_mask.npy.')
  add_model_arguments(parser)
  parser.add_argument('--t1', type=as_path, help='reference contrast, NIfTI')
  parser.add_argument('--t2', type=as_path, help='fully-sampled target contrast, NIfTI')
  parser.add_argument('--kspace', type=as_path,
                      help='target k-space, fastMRI-format .h5, single- or multi-coil')
  parser.add_argument('--reference', type=as_path,
                      help='fully-sampled reference contrast k-space, fastMRI-format .h5')
  parser.add_argument('--align-by-headers', action='store_true',
                      help='a --t1 on another voxel grid than --t2 (IXI\'s T1) is resampled onto '
                           "the T2 grid through the two files' affines (not a registration); "
                           'default: refused')
  parser.add_argument('--acceleration', type=int,
                      help='undersampling factor to simulate (NIfTI: default the config\'s; '
                           'k-space: needed for a fully-sampled file, ignored for one with '
                           'measured lines)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the simulated mask')
  parser.add_argument('--data-consistency', action='store_true',
                      help='put the measured k-space lines back into the output (single-coil '
                           'k-space and NIfTI)')
  parser.add_argument('--batch-size', type=int_at_least(1), default=8,
                      help='slices per step, split over the local devices')
  parser.add_argument('--out', type=as_path, required=True,
                      help='output: .nii/.nii.gz (keeps a NIfTI input\'s affine and header) or, '
                           'from k-space, .h5 with a "reconstruction" dataset')
  return run_command('fsmnet-reconstruct', parser, _reconstruct, argv)


if __name__ == '__main__':
  sys.exit(main())
