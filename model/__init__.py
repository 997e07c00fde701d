"""Kiln model package."""
