"""Per-image normalisation as in the reference's BraTS loader (numpy, per example, for the
input pipeline; jnp, per batch, for jitted inference) and its inverse; centre crop or pad."""

import jax.numpy as jnp
import numpy as np

NORMALIZE_EPS = 1e-11
CLIP = 6.0


def normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """(x - mean) / (std + eps)."""
  return (x - mean) / (std + NORMALIZE_EPS)


def denormalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
  """Inverse of `normalize`."""
  return x * (std + NORMALIZE_EPS) + mean


def denormalize_images(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Normalised (B, H, W, 1) model images with their (B,) statistics -> (B, H, W) intensities
  (numpy or jnp)."""
  return denormalize(x[..., 0], mean[:, None, None], std[:, None, None])


def normalize_example(target_under: np.ndarray, target: np.ndarray, aux: np.ndarray
                      ) -> dict[str, np.ndarray]:
  """The model's inputs and target, normalised as the reference does.

  The undersampled target is normalised by its own mean and (population) std, and the target
  by the same statistics; the auxiliary contrast by its own; all clipped to [-6, 6]. `mean` and
  `std` are returned to map outputs back to intensities.
  """
  mean, std = float(target_under.mean()), float(target_under.std())
  aux_mean, aux_std = float(aux.mean()), float(aux.std())
  clip = lambda x: np.clip(x, -CLIP, CLIP).astype(np.float32)
  return {
      'target_under': clip(normalize(target_under, mean, std)),
      'target': clip(normalize(target, mean, std)),
      'aux': clip(normalize(aux, aux_mean, aux_std)),
      'mean': np.float32(mean),
      'std': np.float32(std),
  }


def normalize_slices(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """`normalize_example`'s normalisation of (B, H, W) intensities inside jitted code: the
  (B, H, W, 1) model input and each slice's (B, 1, 1) mean and std."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  std = jnp.std(x, axis=(1, 2), keepdims=True)
  return jnp.clip(normalize(x, mean, std), -CLIP, CLIP)[..., None], mean, std


def fit_to_size(slices: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Center-crops or zero-pads the last two axes to size x size (or to (rows, cols))."""
  shape = (size, size) if isinstance(size, int) else tuple(size)
  out = np.zeros(slices.shape[:-2] + shape, slices.dtype)
  src, dst = [], []
  for length, wanted in zip(slices.shape[-2:], shape):
    keep = min(length, wanted)
    src.append(slice((length - keep) // 2, (length - keep) // 2 + keep))
    dst.append(slice((wanted - keep) // 2, (wanted - keep) // 2 + keep))
  out[..., dst[0], dst[1]] = slices[..., src[0], src[1]]
  return out
