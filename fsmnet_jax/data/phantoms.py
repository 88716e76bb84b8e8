"""Anatomy-like multi-contrast phantoms: head volumes whose T1 and T2 contrasts differ as tissue
contrasts do (CSF dark in T1 and bright in T2, white matter the reverse, fat bright in both)."""

import numpy as np

# Relative intensities per tissue: (T1-weighted, T2-weighted, PD-weighted, PD fat-suppressed).
TISSUES = {
    'scalp_fat': (0.95, 0.60, 0.80, 0.10),
    'skull': (0.10, 0.08, 0.15, 0.10),
    'gray_matter': (0.55, 0.65, 0.75, 0.70),
    'white_matter': (0.80, 0.45, 0.65, 0.60),
    'csf': (0.15, 1.00, 0.95, 0.95),
    'lesion': (0.40, 0.90, 0.85, 0.85),
}
CONTRASTS = ('t1', 't2', 'pd', 'pdfs')


def _ellipsoid(grid, center, radii, angle):
  z, y, x = (g - c for g, c in zip(grid, center))
  cos, sin = np.cos(angle), np.sin(angle)
  y, x = cos * y - sin * x, sin * y + cos * x
  return (z / radii[0]) ** 2 + (y / radii[1]) ** 2 + (x / radii[2]) ** 2 <= 1


def head_phantom(shape: tuple[int, int, int], rng: np.random.Generator,
                 noise: float = 0.01) -> dict[str, np.ndarray]:
  """Volumes (D, H, W) in [0, ~1] for each of CONTRASTS, from one random anatomy."""
  depth, height, width = shape
  grid = np.meshgrid(np.linspace(-1, 1, depth), np.linspace(-1, 1, height),
                     np.linspace(-1, 1, width), indexing='ij')
  jitter = lambda scale: rng.uniform(-scale, scale)
  head = (1.0, 0.85 + jitter(0.05), 0.72 + jitter(0.05))
  angle = jitter(0.2)
  labels = np.zeros(shape, np.int8)  # 0 = background, then tissues in TISSUES order
  layers = [('scalp_fat', 1.0), ('skull', 0.93), ('gray_matter', 0.86), ('white_matter', 0.62)]
  for name, scale in layers:
    inside = _ellipsoid(grid, (0, 0, 0), [r * scale for r in head], angle)
    labels[inside] = list(TISSUES).index(name) + 1
  for side in (-1, 1):  # lateral ventricles
    center = (jitter(0.1), jitter(0.05) - 0.05, side * (0.12 + jitter(0.03)))
    radii = (0.35, 0.28 + jitter(0.05), 0.07 + jitter(0.02))
    labels[_ellipsoid(grid, center, radii, angle + side * 0.3)] = list(TISSUES).index('csf') + 1
  for _ in range(rng.integers(0, 3)):  # lesions: bright in T2, dim in T1
    center = (jitter(0.5), jitter(0.4), jitter(0.4))
    radii = [rng.uniform(0.05, 0.12)] * 3
    inside = _ellipsoid(grid, center, radii, 0.0) & (labels >= list(TISSUES).index('gray_matter') + 1)
    labels[inside] = list(TISSUES).index('lesion') + 1
  # Smooth bias field and texture, shared by the contrasts as a real coil sensitivity would be.
  bias = 1 + 0.15 * grid[1] * rng.uniform(-1, 1) + 0.1 * grid[2] * rng.uniform(-1, 1)
  volumes = {}
  for i, contrast in enumerate(CONTRASTS):
    lookup = np.array([0.0] + [values[i] for values in TISSUES.values()], np.float32)
    volume = lookup[labels] * bias
    volume = volume + noise * rng.normal(size=shape) * (labels > 0)
    volumes[contrast] = np.clip(volume, 0, None).astype(np.float32)
  return volumes
