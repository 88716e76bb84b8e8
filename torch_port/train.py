"""The reference's training step in PyTorch, for training parity with fsmnet_jax.

Written from a reading of the reference's `train_brats.py` / `train_fastmri.py`: per iteration,
forward, the reference loss, `zero_grad`, `backward`, `clip_grad_norm_` (when clipping is on),
`AdamW.step`, then `StepLR.step`; gradient accumulation and an EMA of the parameters as
fsmnet_jax adds them. Its settings come from the same `config.train` fields that
`fsmnet_jax.train` reads, and its batches are this project's (NHWC numpy, as the grain pipeline
yields them), so both frameworks can be fed the same batches in the same order.
"""

import ml_collections
import numpy as np
import torch

from fsmnet_jax.train import SCHEDULE_DECAY
from torch_port.losses import reference_loss
from torch_port.model import TorchFSMNet, from_nhwc


class ReferenceTrainer:
  """`model` trained as the reference trains it, in `dtype` (parameters and compute)."""

  def __init__(self, model: TorchFSMNet, train_config: ml_collections.ConfigDict,
               dtype: torch.dtype = torch.float32):
    self.model = model.to(dtype).train()
    self.dtype = dtype
    self.clip_norm = train_config.clip_norm
    self.accum_steps = train_config.grad_accum_steps
    self.ema_decay = train_config.ema_decay
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(), lr=train_config.learning_rate,
        betas=(train_config.b1, train_config.b2), weight_decay=train_config.weight_decay)
    self.scheduler = torch.optim.lr_scheduler.StepLR(
        self.optimizer, step_size=train_config.decay_every,
        gamma=SCHEDULE_DECAY[train_config.schedule])
    self.ema = ({name: p.detach().clone() for name, p in self.model.named_parameters()}
                if self.ema_decay else None)

  def step(self, batch: dict[str, np.ndarray]) -> float:
    """One iteration on an NHWC batch ('target_under', 'aux', 'target'); returns its loss."""
    self.optimizer.zero_grad()
    loss = 0.0
    # Beyond the reference, as fsmnet_jax.train does them: micro-batch i takes rows i, i + A,
    # ... and the step follows the mean of their losses; the EMA follows each step.
    for i in range(self.accum_steps):
      micro_batch = {k: from_nhwc(v[i::self.accum_steps], self.dtype) for k, v in batch.items()}
      outputs = self.model(micro_batch['target_under'], micro_batch['aux'])
      micro_loss = reference_loss(outputs, micro_batch['target']) / self.accum_steps
      micro_loss.backward()
      loss += micro_loss.item()
    if self.clip_norm:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    if self.ema is not None:
      with torch.no_grad():
        for name, p in self.model.named_parameters():
          self.ema[name].mul_(self.ema_decay).add_(p, alpha=1 - self.ema_decay)
    return loss

  def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
    """{'params': the model's state_dict, 'ema_params': the same with the EMA's values (when
    config.train.ema_decay)}: what torch_port.convert.torch_to_flax takes."""
    params = {k: v.detach() for k, v in self.model.state_dict().items()}
    if self.ema is None:
      return {'params': params}
    return {'params': params, 'ema_params': {k: self.ema.get(k, v) for k, v in params.items()}}

  def learning_rate(self) -> float:
    """The learning rate of the next step."""
    return self.optimizer.param_groups[0]['lr']
