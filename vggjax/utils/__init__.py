"""Foundations every part shares: '/'-named trees, the atomic writer, optional imports, image files,
the cache directory, a tree of arrays on disk (Orbax)."""
