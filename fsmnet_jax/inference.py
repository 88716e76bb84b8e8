"""Inference: trained weights from any checkpoint, and FSMNet as a jitted function of raw slices.

`load_params` reads what training and export write: a training workdir (its latest step), one
step folder of it, a `save_variables` folder (reference PyTorch `.pth`/`.pt`/`.safetensors`:
`torch_port.checkpoint.load_params`). `Reconstructor` runs FSMNet on zero-filled and reference
slices in their own intensities, batched and sharded over the local devices, compiled once per
batch shape, in float32 or bfloat16. `data_consistency` puts measured k-space samples back into
a reconstruction.
"""

import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsmnet_jax import checkpoint as ckpt, conv, mesh as mesh_lib
from fsmnet_jax.checkpoint import CheckpointError
from fsmnet_jax.data import kspace, transforms
from fsmnet_jax.files import StoragePath, absolute_path, as_path, default_cache_dir
from fsmnet_jax.model import (FSMNet, abstract_params, apply_in_dtype,
                              infer_model_from_params)

# --precision of fsmnet-reconstruct, -export and -eval: the dtype the network computes in. bf16
# is bfloat16 convolutions and matmuls (the FFT blocks and the output stay float32), for
# accelerators and CPUs with bfloat16 units; docs/benchmarks.md has its speed and accuracy.
PRECISIONS = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}
TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')
RUN_CONFIG = 'config.json'  # written by fsmnet-train into the workdir


def load_params(checkpoint: str | os.PathLike, model: FSMNet | None = None,
                use_spa_att: bool = False) -> tuple[dict[str, Any], FSMNet]:
  """(params as numpy, model) from a training workdir, a step folder or a variables folder;
  see `check_params` for `model`. (PyTorch files: `torch_port.checkpoint.load_params`.)"""
  path = as_path(checkpoint)
  if path.suffix in TORCH_SUFFIXES:
    raise CheckpointError(f'{path}: a PyTorch checkpoint; read it with '
                          f'torch_port.checkpoint.load_params (the fsmnet-* commands do)')
  if not path.is_dir():
    raise CheckpointError(f'{path}: no such checkpoint: give a training workdir, a step folder '
                          f'of one, an exported variables folder or a {"/".join(TORCH_SUFFIXES)} '
                          f'file')
  if (path / ckpt.TRAIN_CHECKPOINT_DIR).is_dir():
    step = ckpt.latest_train_step(path)
    if step is None:
      raise CheckpointError(f'{path / ckpt.TRAIN_CHECKPOINT_DIR}: no complete checkpoint yet')
    path, variables = step, ckpt.load_train_params(step)
  elif (path / 'state').is_dir():
    variables = ckpt.load_train_params(path)
  else:
    variables = ckpt.load_variables(path)
  return check_params(path, variables['params'], model, use_spa_att)


def check_params(path: os.PathLike, params: dict[str, Any], model: FSMNet | None = None,
                 use_spa_att: bool = False) -> tuple[dict[str, Any], FSMNet]:
  """(params, model) once `params`, read from `path`, are finite and fit `model` (else a
  CheckpointError names `path` and the differences); without `model`, the model is the one
  the parameters describe."""
  non_finite = [jax.tree_util.keystr(name) for name, value in
                jax.tree_util.tree_leaves_with_path(params) if not np.isfinite(value).all()]
  if non_finite:
    raise CheckpointError(f'{path}: NaN/inf values in {len(non_finite)} parameter arrays, '
                          f'{", ".join(non_finite[:3])}{" ..." if len(non_finite) > 3 else ""}')
  if model is None:
    try:
      return params, infer_model_from_params(params, use_spa_att)
    except ValueError as e:
      raise CheckpointError(f'{path}: {e}') from e
  mismatch = ckpt.describe_mismatch(ckpt.shapes_by_path(abstract_params(model)),
                                    ckpt.shapes_by_path(params))
  if mismatch:
    raise CheckpointError(f'{path}: its parameters do not fit the configured model '
                          f'({mismatch}); check config.model against the run that made it')
  return params, model


def run_config_file(checkpoint: str | os.PathLike) -> StoragePath | None:
  """The config.json of the training run that `checkpoint` (a workdir or one of its step
  folders) belongs to, if there is one."""
  path = absolute_path(checkpoint)
  for folder in (path, path.parent, path.parent.parent):
    if (folder / RUN_CONFIG).is_file() and (folder / ckpt.TRAIN_CHECKPOINT_DIR).is_dir():
      return folder / RUN_CONFIG
  return None


def reconstruct_slices(params: Any, target_under: jax.Array, aux: jax.Array, *,
                       apply_fn: Callable, compute_dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """FSMNet on (B, H, W) zero-filled target and reference intensities -> (B, H, W) float32
  target intensities; each slice normalised as in training (`transforms.normalize_slices`), the
  network run in `compute_dtype` (PRECISIONS)."""
  model_under, mean, std = transforms.normalize_slices(target_under)
  model_aux, _, _ = transforms.normalize_slices(aux)
  outputs = apply_in_dtype(apply_fn, params, model_under, model_aux, compute_dtype)
  return transforms.denormalize(outputs['img_out'][..., 0].astype(jnp.float32), mean, std)


def params_in(precision: str, params: Any) -> Any:
  """`params` stored in `precision`'s dtype (bf16: half the memory and the artifact size)."""
  return jax.tree_util.tree_map(lambda p: jnp.asarray(p, PRECISIONS[precision]), params)


def data_consistency(image: jax.Array, measured: jax.Array, mask: jax.Array,
                     phase: jax.Array | None = None) -> jax.Array:
  """The k-space of `image` with the measured samples put back where `mask` is 1, back in
  image space. (..., H, W) arrays on one k-space grid, DC at the centre.

  With `phase` the object is complex (`image * e^{i phase}`) and the result is a magnitude.
  Without, the object is real (undersampling simulated from a magnitude image) and the result
  is the real part: a magnitude would fold the small negative values around a reconstruction
  into positive noise on the background.
  """
  complex_image = image if phase is None else image * jnp.exp(1j * phase)
  estimate = kspace.fft2c_jnp(complex_image.astype(jnp.complex64))
  consistent = kspace.ifft2c_jnp(jnp.where(mask > 0, measured, estimate))
  return jnp.real(consistent) if phase is None else jnp.abs(consistent)


class Reconstructor:
  """FSMNet on stacks of slices: batches of `batch_size` split over the local devices, the
  last one padded, so one compiled function serves every volume of a given slice size; the
  network in `precision` (PRECISIONS)."""

  def __init__(self, model: FSMNet, params: Any, batch_size: int = 8, precision: str = 'fp32'):
    mesh = mesh_lib.make_mesh(jax.local_devices())
    data_size = mesh.shape['data']
    self.batch_size = math.ceil(batch_size / data_size) * data_size
    self._rows = mesh_lib.rows(mesh)
    replicated = mesh_lib.replicated(mesh)
    self._params = jax.device_put(params_in(precision, params), replicated)
    apply = functools.partial(reconstruct_slices, apply_fn=model.apply,
                              compute_dtype=PRECISIONS[precision])
    self._apply = jax.jit(conv.specialized_for(mesh_lib.platform(mesh), apply),
                          in_shardings=(replicated, self._rows, self._rows),
                          out_shardings=self._rows)

  def __call__(self, target_under: np.ndarray, aux: np.ndarray,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """(slices, H, W) zero-filled target and reference intensities -> reconstructed target."""
    if target_under.shape != aux.shape or target_under.ndim != 3:
      raise ValueError(f'expected two (slices, H, W) stacks of one shape; got '
                       f'{target_under.shape} and {aux.shape}')
    outputs = []
    for start in range(0, len(target_under), self.batch_size):
      rows = slice(start, start + self.batch_size)
      under, reference = (pad_rows(x[rows].astype(np.float32), self.batch_size)
                          for x in (target_under, aux))
      result = self._apply(self._params, jax.device_put(under, self._rows),
                           jax.device_put(reference, self._rows))
      outputs.append(np.asarray(result)[:len(target_under[rows])])
      if on_batch:
        on_batch(start + len(outputs[-1]))
    return np.concatenate(outputs)

  def compiled_shapes(self) -> int:
    """How many input shapes have been compiled so far."""
    return self._apply._cache_size()  # pylint: disable=protected-access


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """`x` with zero rows appended up to `size` rows (the last batch of a jitted loop)."""
  # Zero slices normalise to zeros (std 0 meets the epsilon): no NaN in the padding.
  return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def enable_compilation_cache() -> None:
  """Keeps compiled programs on disk, so a command run again skips XLA compilation: in
  $JAX_COMPILATION_CACHE_DIR if set, else the fsmnet-jax cache folder."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', str(default_cache_dir() / 'xla'))
