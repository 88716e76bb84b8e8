"""Data: k-space simulation, sampling masks, datasets and input pipelines."""


class DataError(ValueError):
  """Input data that cannot be used; the message names the file and the problem."""
