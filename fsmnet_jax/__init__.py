"""fsmnet-jax: FSMNet (MICCAI 2024) multi-contrast MRI reconstruction in JAX/Flax."""

__version__ = '0.1.0'
