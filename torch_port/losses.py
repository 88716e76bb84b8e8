"""The reference training loss in PyTorch (the twin of `fsmnet_jax.losses.reference_loss`)."""

import torch

from fsmnet_jax.losses import FREQUENCY_LOSS_WEIGHT


def reference_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                   frequency_weight: float = FREQUENCY_LOSS_WEIGHT) -> torch.Tensor:
  """L1 on both outputs plus weighted L1 on amplitude and phase of img_fre's rfft2 (NCHW).
  Without a frequency branch ('img_fre' absent) only L1 on img_out remains."""
  l1 = torch.nn.functional.l1_loss
  if 'img_fre' not in outputs:
    return l1(outputs['img_out'], target)
  spectrum_out, spectrum_target = torch.fft.rfft2(outputs['img_fre']), torch.fft.rfft2(target)
  return (l1(outputs['img_out'], target)
          + frequency_weight * l1(spectrum_out.abs(), spectrum_target.abs())
          + frequency_weight * l1(spectrum_out.angle(), spectrum_target.angle())
          + l1(outputs['img_fre'], target))
