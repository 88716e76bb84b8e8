"""The reference's training step in PyTorch, for training parity with fsmnet_jax.

Written from a reading of the reference's `train_brats.py` / `train_fastmri.py`: per iteration,
forward, the reference loss, `zero_grad`, `backward`, `clip_grad_norm_` (when clipping is on),
`AdamW.step`, then `StepLR.step`. Its settings come from the same `config.train` fields that
`fsmnet_jax.train` reads, and its batches are this project's (NHWC numpy, as the grain pipeline
yields them), so both frameworks can be fed the same batches in the same order.
"""

import ml_collections
import numpy as np
import torch

from fsmnet_jax.train import SCHEDULE_DECAY
from torch_port.losses import reference_loss
from torch_port.model import TorchFSMNet


class ReferenceTrainer:
  """`model` trained as the reference trains it, in `dtype` (parameters and compute)."""

  def __init__(self, model: TorchFSMNet, train_config: ml_collections.ConfigDict,
               dtype: torch.dtype = torch.float32):
    if train_config.grad_accum_steps != 1 or train_config.ema_decay:
      raise ValueError('the reference trains without gradient accumulation and EMA; got '
                       f'config.train.grad_accum_steps={train_config.grad_accum_steps}, '
                       f'config.train.ema_decay={train_config.ema_decay}')
    self.model = model.to(dtype).train()
    self.dtype = dtype
    self.clip_norm = train_config.clip_norm
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=train_config.learning_rate,
        betas=(train_config.b1, train_config.b2), weight_decay=train_config.weight_decay)
    self.scheduler = torch.optim.lr_scheduler.StepLR(
        self.optimizer, step_size=train_config.decay_every,
        gamma=SCHEDULE_DECAY[train_config.schedule])

  def step(self, batch: dict[str, np.ndarray]) -> float:
    """One iteration on an NHWC batch ('target_under', 'aux', 'target'); returns its loss."""
    as_nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(
        self.dtype)
    outputs = self.model(as_nchw(batch['target_under']), as_nchw(batch['aux']))
    loss = reference_loss(outputs, as_nchw(batch['target']))
    self.optimizer.zero_grad()
    loss.backward()
    if self.clip_norm:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    return loss.item()

  def learning_rate(self) -> float:
    """The learning rate of the next step."""
    return self.optimizer.param_groups[0]['lr']
