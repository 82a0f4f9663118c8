"""gpuopt: fused Triton kernels for adaptive step-size optimizers and batch normalization.

The host API lives here; device code in ``gpuopt.kernels``; the seed's equations in float64
NumPy in ``gpuopt.reference``.
"""

from . import functional, nn, reference
from ._graphed import GraphedStep, graphed_step
from ._version import __version__
from .clip import clip_grad_norm_, get_total_norm
from .ema import EMA
from .optim import LAMB, LARS, SGD, Adadelta, Adafactor, Adagrad, Adam, AdamW, AdamWScheduleFree, Lion, Muon, RMSprop

__all__ = ["EMA", "LAMB", "LARS", "SGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "AdamW", "AdamWScheduleFree", "GraphedStep", "Lion",
           "Muon", "RMSprop", "clip_grad_norm_", "functional", "get_total_norm", "graphed_step", "nn", "reference",
           "__version__"]
