"""Adagrad, every tensor of a group in one launch, as torch.optim.Adagrad:

    g    = g + λ W
    clr  = η / (1 + (t - 1) lr_decay)
    sum += g²
    W   -= clr g / (sqrt(sum) + ε)

Bytes per element (fp32): read W, g, sum; write W, sum = 20.
"""

import triton
import triton.language as tl

from .. import _launch
from ._multi_tensor import (add_weight_decay, advance_steps, float64_variant, hyper, load_compute, load_grad,
                            load_param, scalar, schedule_entry, step_is_skipped, store_as, store_param, tensor_ptr)

# Sparse gradients are taken densified (gpuopt._fused.dense_grads), as torch takes them sparse
# (not with weight decay, as torch).
SPARSE_GRADS = "without weight decay"
ROLES = ("param", "grad", "step", "sum", "master")
PARAM, GRAD, STEP, SUM, MASTER = (tl.constexpr(i) for i in range(len(ROLES)))  # rows of the offsets table


@triton.jit
def _adagrad_block(param_ptr, grad_ptr, sum_ptr, master_ptr, offsets, mask, clr, eps, weight_decay,
                   grad_scale_ptr, seed, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    w = load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER)
    g = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE), w, weight_decay)
    total = load_compute(sum_ptr + offsets, mask) + g * g
    store_as(sum_ptr + offsets, total, mask)
    w = w - clr * g / (tl.sqrt(total) + eps)
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _adagrad_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                    param_base_ptr, grad_base_ptr, step_base_ptr, sum_base_ptr, master_base_ptr, counter_ptr,
                    lr, lr_ptr, lr_decay, eps, weight_decay,
                    grad_scale_ptr, found_inf_ptr, seed,
                    LR_ON_DEVICE: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    HAS_FOUND_INF: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base_ptr)
    lr_decay, eps, weight_decay = hyper(lr_decay, param_base_ptr), hyper(eps, param_base_ptr), hyper(weight_decay,
                                                                                                  param_base_ptr)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            step = tl.load(tensor_ptr(step_base_ptr, offsets_ptr, STEP, t, n_tensors, ALIGNED)).to(lr.dtype) + 1.0
            clr = lr / (1.0 + (step - 1.0) * lr_decay)
            param_ptr = tensor_ptr(param_base_ptr, offsets_ptr, PARAM, t, n_tensors, ALIGNED)
            grad_ptr = tensor_ptr(grad_base_ptr, offsets_ptr, GRAD, t, n_tensors, ALIGNED)
            sum_ptr = tensor_ptr(sum_base_ptr, offsets_ptr, SUM, t, n_tensors, ALIGNED)
            master_ptr = tensor_ptr(master_base_ptr, offsets_ptr, MASTER, t, n_tensors, ALIGNED)
            tensor_seed = seed + t * 7919 + step.to(tl.int32) * 104729
            if full:
                _adagrad_block(param_ptr, grad_ptr, sum_ptr, master_ptr, offsets, None, clr, eps, weight_decay,
                               grad_scale_ptr, tensor_seed, MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER,
                               STOCHASTIC_ROUNDING)
            else:
                _adagrad_block(param_ptr, grad_ptr, sum_ptr, master_ptr, offsets, offsets < numel, clr, eps,
                               weight_decay, grad_scale_ptr, tensor_seed, MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER,
                               STOCHASTIC_ROUNDING)
    advance_steps(counter_ptr, step_base_ptr, offsets_ptr, STEP, n_tensors, skipped, BLOCK)


_adagrad_f64_kernel = float64_variant(_adagrad_kernel, ("lr", "lr_decay", "eps", "weight_decay"))


def adagrad_(plan, step_args, *, lr, lr_decay, eps, weight_decay, maximize, has_master, stochastic_rounding):
    """Launch one Adagrad step over ``plan`` (roles ``ROLES``)."""
    _launch.launch_step(_adagrad_kernel, _adagrad_f64_kernel, plan, step_args, lr, (lr_decay, eps, weight_decay),
                        dict(MAXIMIZE=maximize), has_master=has_master, stochastic_rounding=stochastic_rounding)
