"""Data: k-space simulation, sampling masks, datasets and input pipelines."""


class DataError(ValueError):
  """Input data that cannot be used; the message names the file and the problem."""


def check_contrasts(data_set: str, contrasts: tuple[str, ...], target: str, reference: str
                    ) -> None:
  """DataError unless `target` and `reference` are two different contrasts of `data_set`."""
  for key, contrast in (('target_contrast', target), ('reference_contrast', reference)):
    if contrast not in contrasts:
      raise DataError(f'config.data.{key}={contrast!r}: {data_set} has {", ".join(contrasts)}')
  if target == reference:
    raise DataError(f'config.data.target_contrast and reference_contrast are both {target!r}; '
                    'the reference must be another contrast')
