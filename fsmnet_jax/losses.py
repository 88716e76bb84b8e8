"""The reference's training loss: L1 on both outputs plus L1 on the frequency output's spectrum."""

import jax
import jax.numpy as jnp

from fsmnet_jax import fourier

FREQUENCY_LOSS_WEIGHT = 0.01  # lambda in the paper's Eq. 8


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(a - b))


def reference_loss(outputs: dict[str, jax.Array], target: jax.Array,
                   frequency_weight: float = FREQUENCY_LOSS_WEIGHT
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss and its terms, as the reference's train_brats.py computes them.

  L1(img_out, t) + w * L1(|F img_fre|, |F t|) + w * L1(angle F img_fre, angle F t)
  + L1(img_fre, t), with F the unnormalised rfft2. Without a frequency branch ('img_fre'
  absent) only the first term remains.
  """
  terms = {'l1_spatial': _l1(outputs['img_out'], target)}
  if 'img_fre' in outputs:
    amp_out, pha_out = fourier.amplitude_phase(outputs['img_fre'])
    amp_target, pha_target = fourier.amplitude_phase(target)
    terms['l1_amplitude'] = _l1(amp_out, amp_target)
    terms['l1_phase'] = _l1(pha_out, pha_target)
    terms['l1_frequency'] = _l1(outputs['img_fre'], target)
    total = (terms['l1_spatial'] + frequency_weight * terms['l1_amplitude']
             + frequency_weight * terms['l1_phase'] + terms['l1_frequency'])
  else:
    total = terms['l1_spatial']
  return total, terms
