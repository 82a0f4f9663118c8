"""RMSprop — the seed's "adadelta" (B.0.1.3) — every tensor of a group in one launch:

    G = α G + (1 - α) g²                        (square_avg)
    ḡ = α ḡ + (1 - α) g                         (grad_avg, centered)
    avg = sqrt(G - ḡ²) + ε                      (PyTorch; FLAGS.eps_inside_sqrt false)
    avg = sqrt(G - ḡ² + ε)                      (the seed: W -= η g / sqrt(G + ε))
    buf = μ buf + g / avg;  W -= η buf          (momentum)
    W  -= η g / avg                             (otherwise)

Bytes per element (fp32, plain): read W, g, G; write W, G = 20.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, add_weight_decay, load_compute, load_grad, load_param, step_flags, store_as,
                            store_param)

ROLES = ("param", "grad", "step", "square_avg", "grad_avg", "momentum_buffer", "master")
HYPER = ("alpha", "one_minus_alpha", "eps", "weight_decay", "momentum")
RMSpropFlags = step_flags("RMSpropFlags", "centered has_momentum eps_inside_sqrt", __name__)


@triton.jit
def _rmsprop_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, _, square_avg_ptr, grad_avg_ptr, momentum_buffer_ptr, master_ptr = ptrs
    alpha, one_minus_alpha, eps, weight_decay, momentum = hyper
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize),
                         w, weight_decay)
    G = alpha * load_compute(square_avg_ptr + offsets, mask) + one_minus_alpha * g * g
    store_as(square_avg_ptr + offsets, G, mask)
    variance = G
    if FLAGS.centered:
        g_avg = alpha * load_compute(grad_avg_ptr + offsets, mask) + one_minus_alpha * g
        store_as(grad_avg_ptr + offsets, g_avg, mask)
        variance = G - g_avg * g_avg
    if FLAGS.eps_inside_sqrt:
        avg = tl.sqrt(variance + eps)
    else:
        avg = tl.sqrt(variance) + eps
    if FLAGS.has_momentum:
        buf = momentum * load_compute(momentum_buffer_ptr + offsets, mask) + g / avg
        store_as(momentum_buffer_ptr + offsets, buf, mask)
        w = w - lr * buf
    else:
        w = w - lr * g / avg
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, alpha, eps, weight_decay, momentum, centered, maximize, eps_inside_sqrt):
    return (dict(alpha=alpha, one_minus_alpha=1.0 - alpha, eps=eps, weight_decay=weight_decay, momentum=momentum),
            dict(centered=centered, has_momentum=momentum > 0, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt))


def _states(options) -> tuple:
    return (("square_avg",) + (("grad_avg",) if options["centered"] else ())
            + (("momentum_buffer",) if options["momentum"] > 0 else ()))


RMSPROP = Algorithm(ROLES, HYPER, _rmsprop_update, RMSpropFlags, _hyperparameters, states=_states)
