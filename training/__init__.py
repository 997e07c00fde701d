"""Kiln training package."""
