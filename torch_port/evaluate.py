"""The reference's evaluation in PyTorch: TorchFSMNet over a split of this project's pipeline,
scored as the reference scores (de-normalise, clip to [0, 1], cast to uint8, then
scikit-image's PSNR and SSIM with their defaults), independently of `fsmnet_jax.metrics`.
"""

import itertools

import ml_collections
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fsmnet_jax.data import pipeline, transforms
from torch_port.model import TorchFSMNet, from_nhwc, to_nhwc


def as_uint8(image: np.ndarray) -> np.ndarray:
  """An intensity image as the reference saves it for scoring: `(clip(x, 0, 1) * 255)` cast
  (truncated) to uint8."""
  return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def reference_scores(model: TorchFSMNet, config: ml_collections.ConfigDict, split: str = 'test',
                     dtype: torch.dtype = torch.float32) -> dict[str, float]:
  """Mean PSNR, SSIM and NMSE of `model`'s `img_out` over `split` (its first
  `config.eval.max_batches` batches of `config.eval.batch_size`, as fsmnet_jax's evaluator),
  named as fsmnet_jax's: eval_psnr, eval_ssim, eval_nmse."""
  loader = pipeline.make_loader(config, split, config.eval.batch_size, num_epochs=1,
                                shuffle=False)
  batches = itertools.islice(loader, config.eval.max_batches or None)
  scores = {'psnr': [], 'ssim': [], 'nmse': []}
  was_training = model.training
  model.eval()
  with torch.no_grad():
    for batch in batches:
      output = model(from_nhwc(batch['target_under'], dtype), from_nhwc(batch['aux'], dtype))
      images = {name: transforms.denormalize_images(x, batch['mean'], batch['std'])
                for name, x in (('target', batch['target']),
                                ('output', to_nhwc(output['img_out'])))}
      for target, prediction in zip(*(map(as_uint8, images[k]) for k in ('target', 'output'))):
        scores['psnr'].append(peak_signal_noise_ratio(target, prediction))
        scores['ssim'].append(structural_similarity(target, prediction))
        error = target.astype(np.float64) - prediction
        scores['nmse'].append(np.sum(error**2) / np.sum(target.astype(np.float64) ** 2))
  model.train(was_training)
  return {f'eval_{name}': float(np.mean(values)) for name, values in scores.items()}
