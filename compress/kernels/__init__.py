"""Custom ops with a plain-PyTorch default implementation (device implementations plug in here)."""
