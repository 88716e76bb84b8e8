"""BraTS: one folder per subject holding `*_t1.nii[.gz]` and `*_t2.nii[.gz]` (2018-2021 naming)
or `*-t1n.nii.gz` and `*-t2w.nii.gz` (2023); T1 guides T2, both on one voxel grid."""

import os
import re

from fsmnet_jax.data.volumes import VolumePair, find_in_subject_folders

CONTRAST_PATTERNS = {
    'T1': re.compile(r'[_-](t1|t1n)\.nii(\.gz)?$', re.IGNORECASE),
    'T2': re.compile(r'[_-](t2|t2w)\.nii(\.gz)?$', re.IGNORECASE),
}


def find_subjects(root: str | os.PathLike) -> list[VolumePair]:
  """Every subject folder under `root` (T2 the target, T1 the reference), sorted by name."""
  return find_in_subject_folders(root, CONTRAST_PATTERNS['T2'].search,
                                 CONTRAST_PATTERNS['T1'].search, 'T2 volume (*_t2.nii.gz)',
                                 'T1 volume (*_t1.nii.gz)')
