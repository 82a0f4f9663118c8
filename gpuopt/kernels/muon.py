"""Muon (Jordan et al. 2024; ``torch.optim.Muon``) — the elementwise parts, every tensor of a group
in one launch each. Between them the host orthogonalizes each momentum-blended update with the
Newton–Schulz iteration (batched matrix products, ``gpuopt._muon``)::

    B = B + (1 - μ) (g - B)                      (torch: buf.lerp_(grad, 1 - μ))
    U = g + μ (B - g)   if nesterov   else   B   (torch: grad.lerp(buf, μ)), stored in bf16
    O = NS(U)                                     (the host, in bf16 as torch)
    W = W (1 - η λ) - η · scale · O              (scale: torch's adjust_lr of W's shape)

``MOMENTUM``: read g, B; write B, U (bf16) = 14 bytes per element (fp32). ``UPDATE``: read W, O
(bf16); write W = 10. The ``lerp`` is torch's, so both sides round alike.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, lerp, load_compute, load_grad, load_param, rounded_as, step_flags, store_as,
                            store_param)

MOMENTUM_ROLES = ("param", "grad", "momentum_buffer", "update")
MOMENTUM_HYPER = ("momentum", "one_minus_momentum")
MomentumFlags = step_flags("MomentumFlags", "nesterov", __name__)


@triton.jit
def _muon_momentum(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    _, grad_ptr, momentum_buffer_ptr, update_ptr = ptrs
    momentum, one_minus_momentum = hyper
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    buf = lerp(load_compute(momentum_buffer_ptr + offsets, mask), g, one_minus_momentum)
    buf = rounded_as(buf, momentum_buffer_ptr).to(g.dtype)  # (the blend reads the stored buffer, as torch's)
    store_as(momentum_buffer_ptr + offsets, buf, mask)
    if FLAGS.nesterov:
        g = lerp(g, buf, momentum)
    else:
        g = buf
    # torch: U in g's dtype, then bf16 (from float64 through float32 here: bf16 rounding is done on fp32 bits)
    store_as(update_ptr + offsets, rounded_as(g, grad_ptr).to(tl.float32), mask)


def _momentum_hyperparameters(*, momentum, nesterov, maximize):
    return dict(momentum=momentum, one_minus_momentum=1.0 - momentum), dict(nesterov=nesterov, maximize=maximize)


def _momentum_states(options) -> tuple:
    return ("momentum_buffer",)


def _no_step(options) -> bool:
    return False


MOMENTUM = Algorithm(MOMENTUM_ROLES, MOMENTUM_HYPER, _muon_momentum, MomentumFlags, _momentum_hyperparameters,
                     states=_momentum_states, uses_step=_no_step, complex_params=False)

UPDATE_ROLES = ("param", "orthogonalized", "lr_scale", "master")
UPDATE_HYPER = ("weight_decay",)
UpdateFlags = step_flags("UpdateFlags", "", __name__)


@triton.jit
def _muon_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, orthogonalized_ptr, lr_scale_ptr, master_ptr = ptrs
    (weight_decay,) = hyper
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    o = load_compute(orthogonalized_ptr + offsets, mask)
    w = w * (1.0 - lr * weight_decay) - (lr * tl.load(lr_scale_ptr).to(w.dtype)) * o
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _update_hyperparameters(*, weight_decay):
    return dict(weight_decay=weight_decay), dict(maximize=False)


UPDATE = Algorithm(UPDATE_ROLES, UPDATE_HYPER, _muon_update, UpdateFlags, _update_hyperparameters, uses_step=_no_step,
                   complex_params=False)
