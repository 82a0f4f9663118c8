"""Adadelta (Zeiler's, as torch.optim.Adadelta; the seed's "adadelta" is RMSprop), one launch:

    g     = g + λ W
    E[g²] = ρ E[g²] + (1 - ρ) g²
    Δ     = sqrt(E[Δ²] + ε) / sqrt(E[g²] + ε) · g
    E[Δ²] = ρ E[Δ²] + (1 - ρ) Δ²
    W    -= η Δ

Bytes per element (fp32): read W, g, E[g²], E[Δ²]; write W, E[g²], E[Δ²] = 28.
"""

import triton
import triton.language as tl

from .. import _launch
from ._multi_tensor import (add_weight_decay, advance_steps, float64_variant, hyper, load_compute, load_grad,
                            load_param, scalar, schedule_entry, step_is_skipped, store_as, store_param, tensor_ptr)

ROLES = ("param", "grad", "step", "square_avg", "acc_delta", "master")
PARAM, GRAD, STEP, SQUARE_AVG, ACC_DELTA, MASTER = (tl.constexpr(i) for i in range(len(ROLES)))  # rows of the offsets table


@triton.jit
def _adadelta_block(param_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, master_ptr, offsets, mask, lr, rho,
                    one_minus_rho, eps, weight_decay, grad_scale_ptr, seed, MAXIMIZE: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    w = load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE), w, weight_decay)
    square_avg = rho * load_compute(square_avg_ptr + offsets, mask) + one_minus_rho * g * g
    acc_delta = load_compute(acc_delta_ptr + offsets, mask)
    delta = tl.sqrt(acc_delta + eps) / tl.sqrt(square_avg + eps) * g
    store_as(square_avg_ptr + offsets, square_avg, mask)
    store_as(acc_delta_ptr + offsets, rho * acc_delta + one_minus_rho * delta * delta, mask)
    store_param(param_ptr, master_ptr, offsets, mask, w - lr * delta, seed, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _adadelta_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                     param_base_ptr, grad_base_ptr, step_base_ptr, square_avg_base_ptr, acc_delta_base_ptr,
                     master_base_ptr, counter_ptr, lr, lr_ptr, rho,
                     one_minus_rho, eps, weight_decay,
                     grad_scale_ptr, found_inf_ptr, seed,
                     LR_ON_DEVICE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                     HAS_FOUND_INF: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                     ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base_ptr)
    rho, one_minus_rho = hyper(rho, param_base_ptr), hyper(one_minus_rho, param_base_ptr)
    eps, weight_decay = hyper(eps, param_base_ptr), hyper(weight_decay, param_base_ptr)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            step = tl.load(tensor_ptr(step_base_ptr, offsets_ptr, STEP, t, n_tensors, ALIGNED)) + 1.0
            param_ptr = tensor_ptr(param_base_ptr, offsets_ptr, PARAM, t, n_tensors, ALIGNED)
            grad_ptr = tensor_ptr(grad_base_ptr, offsets_ptr, GRAD, t, n_tensors, ALIGNED)
            square_avg_ptr = tensor_ptr(square_avg_base_ptr, offsets_ptr, SQUARE_AVG, t, n_tensors, ALIGNED)
            acc_delta_ptr = tensor_ptr(acc_delta_base_ptr, offsets_ptr, ACC_DELTA, t, n_tensors, ALIGNED)
            master_ptr = tensor_ptr(master_base_ptr, offsets_ptr, MASTER, t, n_tensors, ALIGNED)
            tensor_seed = seed + t * 7919 + step.to(tl.int32) * 104729
            if full:
                _adadelta_block(param_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, master_ptr, offsets, None,
                                lr, rho, one_minus_rho, eps, weight_decay, grad_scale_ptr, tensor_seed,
                                MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
            else:
                _adadelta_block(param_ptr, grad_ptr, square_avg_ptr, acc_delta_ptr, master_ptr, offsets,
                                offsets < numel, lr, rho, one_minus_rho, eps, weight_decay, grad_scale_ptr,
                                tensor_seed, MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
    advance_steps(counter_ptr, step_base_ptr, offsets_ptr, STEP, n_tensors, skipped, BLOCK)


_adadelta_f64_kernel = float64_variant(_adadelta_kernel, ("lr", "rho", "one_minus_rho", "eps", "weight_decay"))


def adadelta_(plan, step_args, *, lr, rho, eps, weight_decay, maximize, has_master, stochastic_rounding):
    """Launch one Adadelta step over ``plan`` (roles ``ROLES``)."""
    _launch.launch_step(_adadelta_kernel, _adadelta_f64_kernel, plan, step_args, lr,
                        (rho, 1.0 - rho, eps, weight_decay), dict(MAXIMIZE=maximize),
                        has_master=has_master, stochastic_rounding=stochastic_rounding)
