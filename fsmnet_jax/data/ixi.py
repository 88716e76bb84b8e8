"""IXI (brain-development.org/ixi-dataset): about 580 healthy adults from three London sites
(Guys: Philips 1.5 T; HH, Hammersmith: Philips 3 T; IOP: GE 1.5 T), one NIfTI file per contrast
named `IXI<nnn>-<site>-<id>-<contrast>.nii.gz`, each contrast's tarball unpacking flat into a
folder of its own. T2 and PD are the two echoes of one dual-echo scan, on one axial grid; T1 is
another scan, sagittal, on another grid: as a reference it is resampled onto the target's grid
through the two affines (docs/data.md says what that alignment is and is not).
"""

import logging
import os
import re

from fsmnet_jax.data import DataError, check_contrasts
from fsmnet_jax.data.volumes import VolumePair
from fsmnet_jax.files import StoragePath, as_path, files_under

CONTRASTS = ('T1', 'T2', 'PD')
SITES = ('Guys', 'HH', 'IOP')
FILE_NAME = re.compile(r'^(IXI\d{3}-(Guys|HH|IOP)-\d{4})-(T1|T2|PD)\.nii(\.gz)?$')


def parse_sites(sites: str) -> tuple[str, ...]:
  """'HH' or 'Guys,IOP' as a tuple of site names ('' = every site)."""
  chosen = tuple(s.strip() for s in sites.split(',') if s.strip())
  unknown = [s for s in chosen if s not in SITES]
  if unknown:
    raise DataError(f'config.data.sites={sites!r}: unknown site {", ".join(unknown)}; use some '
                    f'of {", ".join(SITES)} separated by commas ("" for all)')
  return chosen or SITES


def find_subjects(root: str | os.PathLike, target: str = 'T2', reference: str = 'PD',
                  sites: str = '') -> list[VolumePair]:
  """The subjects of the chosen `sites` with both a `target` and a `reference` volume, found
  anywhere under `root`, sorted by name ('IXI002-Guys-0828'). Subjects lacking one of the two
  are left out (IXI has a few) and counted in the log."""
  check_contrasts('IXI', CONTRASTS, target, reference)
  files = _files(root, sites)
  pairs, incomplete = [], []
  for subject, contrasts in sorted(files.items()):
    for contrast in (target, reference):
      if len(contrasts.get(contrast, [])) > 1:
        raise DataError(f'{root}: subject {subject} has {len(contrasts[contrast])} {contrast} '
                        f'volumes: {[str(p) for p in contrasts[contrast]]}; keep one')
    if target in contrasts and reference in contrasts:
      pairs.append(VolumePair(subject, contrasts[target][0], contrasts[reference][0]))
    elif target in contrasts or reference in contrasts:
      incomplete.append(subject)
  if incomplete:
    logging.info('IXI: %d subjects without both %s and %s left out: %s', len(incomplete),
                 target, reference, ', '.join(incomplete[:10]))
  if not pairs:
    raise DataError(f'{root}: no IXI subject of {"/".join(parse_sites(sites))} with both a '
                    f'{target} and a {reference} volume (IXI<nnn>-<site>-<id>-{target}.nii.gz and '
                    f'-{reference}.nii.gz, anywhere under the folder)')
  return pairs


def subject_names(root: str | os.PathLike, sites: str = '') -> list[str]:
  """Every subject of the chosen `sites` under `root`, whatever contrasts it has: what the
  split divides, so that runs with another pair of contrasts test on the same subjects."""
  return sorted(_files(root, sites))


def _files(root: str | os.PathLike, sites: str) -> dict[str, dict[str, list[StoragePath]]]:
  """{subject: {contrast: files}} of the IXI files of `sites` anywhere under `root`."""
  chosen_sites = parse_sites(sites)
  root = as_path(root)
  if not root.is_dir():
    raise DataError(f'{root}: no such data folder')
  files: dict[str, dict[str, list[StoragePath]]] = {}
  for path in files_under(root):
    match = FILE_NAME.match(path.name)
    if match and match.group(2) in chosen_sites:
      files.setdefault(match.group(1), {}).setdefault(match.group(3), []).append(path)
  return files
