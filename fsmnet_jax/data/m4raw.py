"""M4Raw (Lyu et al., Scientific Data 2023; zenodo.org/records/8056074): raw k-space of 183
volunteers' brains at 0.3 T, 4 receive coils, in fastMRI-style h5 files (`kspace` (slices, coils,
rows, cols), `reconstruction_rss`, `ismrmrd_header`) named `<study>_<contrast><repetition>.h5`
(`2022061003_T201.h5`: T2, repetition 1). Each contrast was scanned several times (T1 and T2
three times, FLAIR twice) in one session, so the contrasts of a subject are paired slice by
slice without alignment. The download's folders are the split: multicoil_train for training,
multicoil_val for the test split.
"""

import logging
import os
import re

from fsmnet_jax.data import DataError, check_contrasts, fastmri
from fsmnet_jax.files import StoragePath, as_path

CONTRASTS = ('T1', 'T2', 'FLAIR')
SPLIT_FOLDERS = {'train': 'multicoil_train', 'test': 'multicoil_val'}
FILE_NAME = re.compile(r'^(\d+)_(T1|T2|FLAIR)(\d{2})\.h5$')


def find_pairs(root: str | os.PathLike, split: str, target: str = 'T2', reference: str = 'T1',
               repetition: int = 0) -> list[fastmri.KspacePair]:
  """The subjects of `split` with both contrasts, sorted: repetition k of each (1, 2, ...), or
  with 0 all repetitions, whose k-space is averaged."""
  check_contrasts('M4Raw', CONTRASTS, target, reference)
  if repetition < 0:
    raise DataError(f'config.data.repetition={repetition}: 1, 2, ... or 0 for the average')
  folder = as_path(root) / SPLIT_FOLDERS[split]
  if not folder.is_dir():
    raise DataError(f'{folder}: no such folder; config.data.root is the folder holding '
                    f'{" and ".join(SPLIT_FOLDERS.values())}')
  files: dict[str, dict[str, dict[int, StoragePath]]] = {}
  for path in sorted(folder.glob('*.h5')):
    match = FILE_NAME.match(path.name)
    if match:
      subject, contrast, number = match.group(1), match.group(2), int(match.group(3))
      files.setdefault(subject, {}).setdefault(contrast, {})[number] = path
  pairs, incomplete = [], []
  for subject, contrasts in sorted(files.items()):
    if target not in contrasts or reference not in contrasts:
      incomplete.append(subject)
      continue
    chosen = {}
    for contrast in (target, reference):
      available = contrasts[contrast]
      if repetition and repetition not in available:
        raise DataError(f'{folder}: subject {subject} has no {contrast} repetition {repetition} '
                        f'(it has {sorted(available)}); choose config.data.repetition')
      chosen[contrast] = tuple(available[k] for k in sorted(available)
                               if repetition in (0, k))
    shapes = {path: fastmri.kspace_shape(path, multicoil=True)
              for path in chosen[target] + chosen[reference]}
    # Slices are paired by index (one session, one slice plan): the shapes must agree.
    if len(set(shapes.values())) > 1:
      raise DataError(f'{folder}: subject {subject}\'s files differ in shape (slices, coils, '
                      'rows, cols): ' + ', '.join(f'{p.name} {s}' for p, s in shapes.items()))
    pairs.append(fastmri.KspacePair(subject, chosen[target], chosen[reference],
                                    next(iter(shapes.values()))[0]))
  if incomplete:
    logging.info('M4Raw: %d subjects without both %s and %s left out: %s', len(incomplete),
                 target, reference, ', '.join(incomplete[:10]))
  if not pairs:
    raise DataError(f'{folder}: no subject with both {target} and {reference} files '
                    f'(<study>_{target}01.h5, <study>_{reference}01.h5)')
  return pairs
