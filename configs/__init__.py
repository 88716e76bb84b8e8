"""Training and evaluation settings: `get_config()` files, loaded by path (`--config configs/x.py`)."""
