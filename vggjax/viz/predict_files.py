"""Deprecated alias: moved to `vggjax.inference.predictor`; this module goes in the next release."""
from vggjax.utils.deprecation import moved_module

__getattr__ = moved_module(__name__, "vggjax.inference.predictor")
