"""CUDA sources of the optional kernels (package data; compiled by compress.kernels.build)."""
