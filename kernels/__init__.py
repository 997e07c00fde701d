"""Kiln kernels package."""
