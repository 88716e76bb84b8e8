"""PyTorch side of fsmnet-jax: TorchFSMNet (the reference's twin) and weight converters."""

from torch_port.model import TorchFSMNet

__all__ = ['TorchFSMNet']
