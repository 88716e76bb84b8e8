"""The reference's optimiser: gradient clipping as torch's clip_grad_norm_, then AdamW."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6), not max_norm / norm.
TORCH_CLIP_EPS = 1e-6
TRAINED, UNUSED = 'trained', 'unused'


def clip_by_global_norm_like_torch(max_norm: float) -> optax.GradientTransformation:
  """Scales gradients by min(1, max_norm / (global_norm + 1e-6)), as PyTorch does."""

  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + TORCH_CLIP_EPS))
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def parameter_labels(params: Any, model: nn.Module) -> Any:
  """TRAINED for every parameter, UNUSED for the FS-fusion `spa_att` weights the reference
  never uses (unless `model.use_spa_att`): PyTorch's AdamW skips parameters without gradient,
  so they must not even be weight-decayed."""

  def label(path, _):
    names = [getattr(p, 'key', '') for p in path]
    return UNUSED if 'spa_att' in names and not model.use_spa_att else TRAINED

  return jax.tree_util.tree_map_with_path(label, params)


def reference_optimizer(learning_rate: float | optax.Schedule, labels: Any,
                        clip_norm: float | None = 0.01, b1: float = 0.9, b2: float = 0.999,
                        weight_decay: float = 1e-4, eps: float = 1e-8
                        ) -> optax.GradientTransformation:
  """Clipping (as torch, `None` to skip) then AdamW, leaving UNUSED parameters untouched."""
  steps = [clip_by_global_norm_like_torch(clip_norm)] if clip_norm is not None else []
  steps.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.multi_transform({TRAINED: optax.chain(*steps), UNUSED: optax.set_to_zero()},
                               labels)
