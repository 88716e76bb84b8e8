"""FSMNet inference as a serialized `jax.export` artifact: StableHLO with the weights inside, so
a serving system runs it without this package's model code.

The exported function is `reconstruct_slices` with the parameters bound: (B, H, W) zero-filled
target and reference intensities in, (B, H, W) reconstructed intensities out (float32), the
network in float32 or bfloat16.
The batch is symbolic unless fixed, H and W are fixed.
"""

import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import export

from fsmnet_jax import conv
from fsmnet_jax.files import write_atomically
from fsmnet_jax.inference import PRECISIONS, params_in, reconstruct_slices
from fsmnet_jax.model import DOWNSAMPLING_FACTOR, FSMNet


# What jax.export lowers for (an artifact's platforms are checked only where it is called).
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_inference(model: FSMNet, params: Any, image_size: int, batch_size: int | None = None,
                     platforms: Sequence[str] | None = None, precision: str = 'fp32'
                     ) -> export.Exported:
  """The exported inference function for image_size x image_size slices; `batch_size` None
  gives a symbolic batch dimension; `platforms` default to this machine's; the network and its
  stored weights in `precision` (inference.PRECISIONS; float32 in and out either way)."""
  if image_size <= 0 or image_size % DOWNSAMPLING_FACTOR:
    raise ValueError(f'image size {image_size} must be a positive multiple of '
                     f'{DOWNSAMPLING_FACTOR}')
  unknown = sorted(set(platforms or ()) - set(PLATFORMS))
  if unknown:
    raise ValueError(f'platforms {", ".join(map(repr, unknown))}: use some of '
                     f'{", ".join(PLATFORMS)}')
  batch = export.symbolic_shape('b')[0] if batch_size is None else batch_size
  params = params_in(precision, params)
  function = lambda under, aux: reconstruct_slices(params, under, aux, apply_fn=model.apply,
                                                   compute_dtype=PRECISIONS[precision])
  # Lowered for one platform, the convolutions need only its path; for several, all of theirs.
  if platforms is None:
    platform = jax.default_backend()
  else:
    platform = platforms[0] if len(platforms) == 1 else None
  function = jax.jit(conv.specialized_for(platform, function))
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size), jnp.float32)
  return export.export(function, platforms=platforms)(spec, spec)


def save_exported(exported: export.Exported, path: str | os.PathLike,
                  overwrite: bool = False) -> Path:
  """Writes the serialized artifact (refused if `path` exists, unless `overwrite`)."""
  return write_atomically(path, lambda tmp: tmp.write_bytes(exported.serialize()), overwrite)
