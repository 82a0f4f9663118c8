"""RMSprop — the seed's "adadelta" (B.0.1.3) — every tensor of a group in one launch:

    G = α G + (1 - α) g²                        (square_avg)
    ḡ = α ḡ + (1 - α) g                         (grad_avg, centered)
    avg = sqrt(G - ḡ²) + ε                      (PyTorch; EPS_INSIDE_SQRT=False)
    avg = sqrt(G - ḡ² + ε)                      (the seed: W -= η g / sqrt(G + ε))
    buf = μ buf + g / avg;  W -= η buf          (momentum)
    W  -= η g / avg                             (otherwise)

Bytes per element (fp32, plain): read W, g, G; write W, G = 20.
"""

import triton
import triton.language as tl

from .. import _launch
from ._multi_tensor import (add_weight_decay, advance_steps, float64_variant, hyper, load_compute, load_grad,
                            load_param, scalar, schedule_entry, step_is_skipped, store_as, store_param, tensor_ptr)

ROLES = ("param", "grad", "step", "square_avg", "grad_avg", "momentum_buffer", "master")
PARAM, GRAD, STEP, SQUARE_AVG, GRAD_AVG, MOMENTUM_BUFFER, MASTER = (tl.constexpr(i) for i in range(len(ROLES)))  # rows of the offsets table


@triton.jit
def _rmsprop_block(param_ptr, grad_ptr, square_avg_ptr, grad_avg_ptr, buf_ptr, master_ptr, offsets, mask,
                   lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_scale_ptr, seed,
                   CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, MAXIMIZE: tl.constexpr,
                   EPS_INSIDE_SQRT: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    w = load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE), w, weight_decay)
    G = alpha * load_compute(square_avg_ptr + offsets, mask) + one_minus_alpha * g * g
    store_as(square_avg_ptr + offsets, G, mask)
    variance = G
    if CENTERED:
        g_avg = alpha * load_compute(grad_avg_ptr + offsets, mask) + one_minus_alpha * g
        store_as(grad_avg_ptr + offsets, g_avg, mask)
        variance = G - g_avg * g_avg
    if EPS_INSIDE_SQRT:
        avg = tl.sqrt(variance + eps)
    else:
        avg = tl.sqrt(variance) + eps
    if HAS_MOMENTUM:
        buf = momentum * load_compute(buf_ptr + offsets, mask) + g / avg
        store_as(buf_ptr + offsets, buf, mask)
        w = w - lr * buf
    else:
        w = w - lr * g / avg
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _rmsprop_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                    param_base_ptr, grad_base_ptr, step_base_ptr, square_avg_base_ptr, grad_avg_base_ptr,
                    buf_base_ptr, master_base_ptr, counter_ptr,
                    lr, lr_ptr, alpha, one_minus_alpha, eps,
                    weight_decay, momentum, grad_scale_ptr, found_inf_ptr, seed,
                    LR_ON_DEVICE: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                    MAXIMIZE: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    HAS_FOUND_INF: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base_ptr)
    alpha, one_minus_alpha = hyper(alpha, param_base_ptr), hyper(one_minus_alpha, param_base_ptr)
    eps, weight_decay = hyper(eps, param_base_ptr), hyper(weight_decay, param_base_ptr)
    momentum = hyper(momentum, param_base_ptr)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            step = tl.load(tensor_ptr(step_base_ptr, offsets_ptr, STEP, t, n_tensors, ALIGNED)) + 1.0
            param_ptr = tensor_ptr(param_base_ptr, offsets_ptr, PARAM, t, n_tensors, ALIGNED)
            grad_ptr = tensor_ptr(grad_base_ptr, offsets_ptr, GRAD, t, n_tensors, ALIGNED)
            square_avg_ptr = tensor_ptr(square_avg_base_ptr, offsets_ptr, SQUARE_AVG, t, n_tensors, ALIGNED)
            grad_avg_ptr = tensor_ptr(grad_avg_base_ptr, offsets_ptr, GRAD_AVG, t, n_tensors, ALIGNED)
            buf_ptr = tensor_ptr(buf_base_ptr, offsets_ptr, MOMENTUM_BUFFER, t, n_tensors, ALIGNED)
            master_ptr = tensor_ptr(master_base_ptr, offsets_ptr, MASTER, t, n_tensors, ALIGNED)
            tensor_seed = seed + t * 7919 + step.to(tl.int32) * 104729
            if full:
                _rmsprop_block(param_ptr, grad_ptr, square_avg_ptr, grad_avg_ptr, buf_ptr, master_ptr, offsets,
                               None, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_scale_ptr,
                               tensor_seed, CENTERED, HAS_MOMENTUM, MAXIMIZE, EPS_INSIDE_SQRT, HAS_GRAD_SCALE,
                               HAS_MASTER, STOCHASTIC_ROUNDING)
            else:
                _rmsprop_block(param_ptr, grad_ptr, square_avg_ptr, grad_avg_ptr, buf_ptr, master_ptr, offsets,
                               offsets < numel, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                               grad_scale_ptr, tensor_seed, CENTERED, HAS_MOMENTUM, MAXIMIZE, EPS_INSIDE_SQRT,
                               HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
    advance_steps(counter_ptr, step_base_ptr, offsets_ptr, STEP, n_tensors, skipped, BLOCK)


_rmsprop_f64_kernel = float64_variant(_rmsprop_kernel, ("lr", "alpha", "one_minus_alpha", "eps", "weight_decay",
                                                        "momentum"))


def rmsprop_(plan, step_args, *, lr, alpha, eps, weight_decay, momentum, centered, maximize,
             eps_inside_sqrt, has_master, stochastic_rounding):
    """Launch one RMSprop step over ``plan`` (roles ``ROLES``)."""
    _launch.launch_step(_rmsprop_kernel, _rmsprop_f64_kernel, plan, step_args, lr,
                        (alpha, 1.0 - alpha, eps, weight_decay, momentum),
                        dict(CENTERED=centered, HAS_MOMENTUM=momentum > 0, MAXIMIZE=maximize,
                             EPS_INSIDE_SQRT=eps_inside_sqrt),
                        has_master=has_master, stochastic_rounding=stochastic_rounding)
