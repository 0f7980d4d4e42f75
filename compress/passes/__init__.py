"""Compression passes. Each module registers its passes with :func:`compress.registry.register_pass`."""
