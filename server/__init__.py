"""Kiln server package."""
