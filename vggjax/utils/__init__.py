"""Foundations every part shares: '/'-named trees, the atomic writer, optional imports, image files."""
