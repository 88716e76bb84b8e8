"""Runs TorchFSMNet and Flax FSMNet on the same random inputs and measures their agreement.

Float32 outputs of this network carry rounding noise amplified ~1e3-1e4x (angle() jumps across
the negative real axis), so float32 agreement is judged against PyTorch's own float32 noise:
both frameworks' float32 outputs are compared with PyTorch in float64. Float64 agreement is
judged absolutely at power-of-two sizes, where no FFT bin is ambiguous.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from fsmnet_jax import conv
from fsmnet_jax.model import FSMNet
from torch_port.model import TorchFSMNet, from_nhwc, to_nhwc

OUTPUTS = ('img_out', 'img_fre')
FLOAT64_TOLERANCE = 1e-9  # max relative error, power-of-two sizes
FLOAT32_NOISE_FACTOR = 2.0  # Flax-f32 error may be at most this times torch-f32's own error
# Relative input perturbations at float32 rounding level; 0 (the input itself) must come first.
PERTURBATIONS = (0.0, 1e-7, -1e-7, 2e-7, -2e-7)


@dataclasses.dataclass
class Error:
  """Disagreement of an output with a reference output."""
  max_abs: float
  max_rel: float  # max |a - b| / max |b|
  rel_l2: float  # ||a - b|| / ||b||

  @classmethod
  def between(cls, value: np.ndarray, reference: np.ndarray) -> 'Error':
    diff = np.abs(value.astype(np.float64) - reference.astype(np.float64))
    return cls(float(diff.max()), float(diff.max() / np.abs(reference).max()),
               float(np.linalg.norm(diff) / np.linalg.norm(reference)))

  def __str__(self) -> str:
    return f'max abs {self.max_abs:.2e}, max rel {self.max_rel:.2e}, rel L2 {self.rel_l2:.2e}'


def random_inputs(batch: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(target_under, aux) in NHWC, float64, uniform in [0, 1)."""
  rng = np.random.default_rng(seed)
  return rng.random((batch, size, size, 1)), rng.random((batch, size, size, 1))


def torch_outputs(model: TorchFSMNet, target_under: np.ndarray, aux: np.ndarray,
                  dtype: torch.dtype) -> dict[str, np.ndarray]:
  """NHWC numpy outputs of `model` run in `dtype` on NHWC numpy inputs."""
  model = model.to(dtype).eval()
  with torch.no_grad():
    out = model(from_nhwc(target_under, dtype), from_nhwc(aux, dtype))
  return {k: to_nhwc(v) for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: FSMNet, variables: dict, target_under: jax.Array, aux: jax.Array):
  return conv.specialized_for(jax.default_backend(), model.apply)(variables, target_under, aux)


def flax_outputs(model: FSMNet, variables: dict, target_under: np.ndarray, aux: np.ndarray,
                 dtype: str) -> dict[str, np.ndarray]:
  """Numpy outputs of the jitted Flax model run in 'float32' or 'float64'."""
  with jax.enable_x64(dtype == 'float64'):
    cast = lambda x: jnp.asarray(x, dtype)
    out = _apply(model, jax.tree_util.tree_map(cast, variables), cast(target_under), cast(aux))
    return {k: np.asarray(v) for k, v in out.items()}


def _float64_comparable(size: int) -> bool:
  # At other sizes FFT libraries differ in the sign of ~0 imaginary parts of bins that are real
  # in exact arithmetic, which flips an angle by 2*pi even in float64.
  return size & (size - 1) == 0


def _envelope(errors: list[dict[str, Error]], name: str) -> Error:
  """The largest of each error measure over the perturbed evaluations of one output."""
  return Error(*(max(getattr(e[name], field) for e in errors)
                 for field in ('max_abs', 'max_rel', 'rel_l2')))


@dataclasses.dataclass
class ParityReport:
  """Every comparison of one parity run, and whether it meets the criteria.

  float32 errors are measured on the input and on its ulp-level perturbations
  x * (1 + eps), each against torch-float64 on the same perturbed input. Which near-axis FFT
  bins flip their angle by 2*pi is a coin toss per float32 evaluation, so the float32 noise of
  an input is the envelope (largest error) over these evaluations, not one of them.
  """
  size: int
  float64: dict[str, Error]  # Flax f64 vs torch f64; empty where not compared
  flax_float32: list[dict[str, Error]]  # per perturbation: Flax f32 vs torch f64
  torch_float32: list[dict[str, Error]]  # per perturbation: torch f32 vs torch f64

  @property
  def float64_judged(self) -> bool:
    return _float64_comparable(self.size)

  def float32_ratio(self, name: str) -> float:
    """Flax's float32 error envelope over the reference's, the worse of max-rel and rel-L2."""
    flax, reference = _envelope(self.flax_float32, name), _envelope(self.torch_float32, name)
    return max(flax.max_rel / reference.max_rel, flax.rel_l2 / reference.rel_l2)

  @property
  def passed(self) -> bool:
    float64_ok = all(e.max_rel < FLOAT64_TOLERANCE for e in self.float64.values())
    return float64_ok and all(self.float32_ratio(k) <= FLOAT32_NOISE_FACTOR for k in OUTPUTS)

  def lines(self) -> list[str]:
    lines = [f'parity at {self.size}x{self.size} px, same random inputs and weights '
             f'(float32: worst of {len(self.flax_float32)} ulp-perturbed evaluations):']
    for name in OUTPUTS:
      if name in self.float64:
        lines.append(f'  {name}: flax-f64 vs torch-f64: {self.float64[name]}')
      lines += [f'  {name}: flax-f32 vs torch-f64: {_envelope(self.flax_float32, name)}',
                f'  {name}: torch-f32 vs torch-f64 (reference noise): '
                f'{_envelope(self.torch_float32, name)}',
                f'  {name}: float32 ratio flax/reference: {self.float32_ratio(name):.2f}']
    criterion = (f'float64 max rel < {FLOAT64_TOLERANCE:g}' if self.float64_judged
                 else 'float64 not compared (size not a power of two, docs/parity.md)')
    lines.append(f'  {"PASS" if self.passed else "FAIL"}: {criterion}; float32 error <= '
                 f"{FLOAT32_NOISE_FACTOR:g}x the reference's own float32 noise")
    return lines


def check_parity(torch_model: TorchFSMNet, variables: dict, model: FSMNet, size: int = 64,
                 batch: int = 1, seed: int = 0,
                 perturbations: tuple[float, ...] = PERTURBATIONS) -> ParityReport:
  """Compares the two frameworks in float32 on the same random inputs, and in float64 at
  power-of-two sizes (the only ones where float64 agreement means something)."""
  target_under, aux = random_inputs(batch, size, seed)
  flax32, torch32, float64 = [], [], {}
  for eps in perturbations:
    inputs = (target_under * (1 + eps), aux * (1 + eps))
    exact = torch_outputs(torch_model, *inputs, torch.float64)
    compare = lambda outputs: {k: Error.between(outputs[k], exact[k]) for k in exact}
    if eps == 0 and _float64_comparable(size):
      float64 = compare(flax_outputs(model, variables, *inputs, 'float64'))
    torch32.append(compare(torch_outputs(torch_model, *inputs, torch.float32)))
    flax32.append(compare(flax_outputs(model, variables, *inputs, 'float32')))
  torch_model.float()
  return ParityReport(size, float64, flax32, torch32)
