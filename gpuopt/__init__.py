"""gpuopt: fused Triton kernels for adaptive step-size optimizers and batch normalization.

The host API lives here; device code in ``gpuopt.kernels``; the seed's equations in float64
NumPy in ``gpuopt.reference``.
"""

from . import reference
from ._version import __version__
from .ema import EMA

__all__ = ["EMA", "reference", "__version__"]
