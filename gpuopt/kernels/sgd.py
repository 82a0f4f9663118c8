"""SGD with momentum (seed B.0.1.2), every tensor of a group in one launch, as torch.optim.SGD:

    d_p = g + λ W
    buf = d_p                                   (first step)
    buf = μ buf + (1 - dampening) d_p           (later steps)
    d_p = d_p + μ buf  (nesterov)   or   buf
    W   = W - η d_p

With dampening 0 this is the seed's V-form, V = η·buf. Bytes per element (fp32, momentum):
read W, g, buf; write W, buf = 20. "First step" is per tensor: its ``step`` (a device scalar,
advanced by the kernel, not by a skipped AMP step) is still 0.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_grad, load_param, load_unless_new, step_flags, store_as,
                            store_param)

ROLES = ("param", "grad", "step", "momentum_buffer", "master")
HYPER = ("momentum", "one_minus_dampening", "weight_decay", "first_step")
SGDFlags = step_flags("SGDFlags", "has_momentum has_step nesterov", __name__)


@triton.jit
def _sgd_buffer_in_use(step, lr, hyper, FLAGS: tl.constexpr):
    """Per tensor: has a step written its momentum buffer (not at its first step — new, or its
    first step was skipped — or, without steps, when the caller says ``first_step``), and the
    weight of d_p in the new buffer: 1 - dampening, or 1 for a new one."""
    _, one_minus_dampening, _, first_step = hyper
    if FLAGS.has_step:
        in_use = step != 1.0
    else:
        in_use = first_step == 0.0
    return in_use, tl.where(in_use, one_minus_dampening, 1.0)


@triton.jit
def _sgd_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, momentum_buffer_ptr, master_ptr = ptrs
    momentum, _, weight_decay, _ = hyper
    in_use, d_p_weight = scalars
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    d_p = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize),
                           w, weight_decay)
    if FLAGS.has_momentum:
        # A new buffer takes buf = d_p, written as μ·0 + 1·d_p: a read that a new buffer skips and
        # the per-tensor weight of d_p (load_unless_new).
        buf = momentum * load_unless_new(momentum_buffer_ptr, offsets, mask, in_use) + d_p_weight * d_p
        store_as(momentum_buffer_ptr + offsets, buf, mask)
        if FLAGS.nesterov:
            d_p = d_p + momentum * buf
        else:
            d_p = buf
    store_param(param_ptr, master_ptr, offsets, mask, w - lr * d_p, seed, FLAGS.has_master,
                FLAGS.stochastic_rounding)


def _hyperparameters(*, momentum, dampening, weight_decay, nesterov, maximize, has_step, first_step=False):
    """With ``has_step`` each tensor's ``step`` says whether its momentum buffer is new (0: ``buf
    = d_p``) and is advanced by the kernel; without, ``first_step`` says it for every tensor."""
    return (dict(momentum=momentum, one_minus_dampening=1.0 - dampening, weight_decay=weight_decay,
                 first_step=float(bool(first_step))),
            dict(has_momentum=momentum != 0, has_step=has_step, nesterov=nesterov, maximize=maximize))


def _states(options) -> tuple:
    return ("momentum_buffer",) if options["momentum"] != 0 else ()


def _uses_step(options) -> bool:
    return options["has_step"]


# Sparse gradients are taken densified (gpuopt._fused.dense_grads), as torch takes them sparse.
SGD = Algorithm(ROLES, HYPER, _sgd_update, SGDFlags, _hyperparameters, per_tensor=_sgd_buffer_in_use, states=_states,
                uses_step=_uses_step, sparse_grads="always")
