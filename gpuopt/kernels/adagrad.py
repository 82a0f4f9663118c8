"""Adagrad, every tensor of a group in one launch, as torch.optim.Adagrad:

    g    = g + λ W
    clr  = η / (1 + (t - 1) lr_decay)
    sum += g²
    W   -= clr g / (sqrt(sum) + ε)

Bytes per element (fp32): read W, g, sum; write W, sum = 20.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_compute, load_grad, load_param, step_flags, store_as,
                            store_param)

ROLES = ("param", "grad", "step", "sum", "master")
HYPER = ("lr_decay", "eps", "weight_decay")
AdagradFlags = step_flags("AdagradFlags", "", __name__)


@triton.jit
def _adagrad_step_size(step, lr, hyper, FLAGS: tl.constexpr):
    """Per tensor: clr = η / (1 + (t - 1) lr_decay)."""
    lr_decay, _, _ = hyper
    return (lr / (1.0 + (step - 1.0) * lr_decay),)


@triton.jit
def _adagrad_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, sum_ptr, master_ptr = ptrs
    _, eps, weight_decay = hyper
    (clr,) = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize),
                         w, weight_decay)
    total = load_compute(sum_ptr + offsets, mask) + g * g
    store_as(sum_ptr + offsets, total, mask)
    w = w - clr * g / (tl.sqrt(total) + eps)
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, lr_decay, eps, weight_decay, maximize):
    return dict(lr_decay=lr_decay, eps=eps, weight_decay=weight_decay), dict(maximize=maximize)


def _states(options) -> tuple:
    return ("sum",)


# Sparse gradients are taken densified (gpuopt._fused.dense_grads), as torch takes them sparse
# (not with weight decay, as torch).
ADAGRAD = Algorithm(ROLES, HYPER, _adagrad_update, AdagradFlags, _hyperparameters, per_tensor=_adagrad_step_size,
                    states=_states, sparse_grads="without weight decay")
