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

from .. import _launch
from ._multi_tensor import (add_weight_decay, advance_steps, float64_variant, hyper, load_compute, load_grad,
                            load_param, scalar, schedule_entry, step_is_skipped, store_as, store_param, tensor_ptr)

# Sparse gradients are taken densified (gpuopt._fused.dense_grads), as torch takes them sparse.
SPARSE_GRADS = "always"
ROLES = ("param", "grad", "step", "momentum_buffer", "master")
PARAM, GRAD, STEP, MOMENTUM_BUFFER, MASTER = (tl.constexpr(i) for i in range(len(ROLES)))  # rows of the offsets table


@triton.jit
def _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, mask, lr, momentum, one_minus_dampening,
               weight_decay, first_step, grad_scale_ptr, seed,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    w = load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER)
    d_p = add_weight_decay(load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE), w,
                           weight_decay)
    if HAS_MOMENTUM:
        if first_step:
            buf = d_p
        else:
            buf = momentum * load_compute(buf_ptr + offsets, mask) + one_minus_dampening * d_p
        store_as(buf_ptr + offsets, buf, mask)
        if NESTEROV:
            d_p = d_p + momentum * buf
        else:
            d_p = buf
    store_param(param_ptr, master_ptr, offsets, mask, w - lr * d_p, seed, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _sgd_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                param_base_ptr, grad_base_ptr, step_base_ptr, buf_base_ptr, master_base_ptr, counter_ptr,
                lr, lr_ptr, momentum, one_minus_dampening,
                weight_decay, first_step,
                grad_scale_ptr, found_inf_ptr, seed,
                LR_ON_DEVICE: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_STEP: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base_ptr)
    momentum, one_minus_dampening = hyper(momentum, param_base_ptr), hyper(one_minus_dampening, param_base_ptr)
    weight_decay = hyper(weight_decay, param_base_ptr)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            if HAS_STEP:  # a buffer that no step has written yet (new, or its first step was skipped)
                first = tl.load(tensor_ptr(step_base_ptr, offsets_ptr, STEP, t, n_tensors, ALIGNED)) == 0.0
            else:
                first = first_step != 0
            param_ptr = tensor_ptr(param_base_ptr, offsets_ptr, PARAM, t, n_tensors, ALIGNED)
            grad_ptr = tensor_ptr(grad_base_ptr, offsets_ptr, GRAD, t, n_tensors, ALIGNED)
            buf_ptr = tensor_ptr(buf_base_ptr, offsets_ptr, MOMENTUM_BUFFER, t, n_tensors, ALIGNED)
            master_ptr = tensor_ptr(master_base_ptr, offsets_ptr, MASTER, t, n_tensors, ALIGNED)
            tensor_seed = seed + t * 7919
            if full:
                _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, None, lr, momentum,
                           one_minus_dampening, weight_decay, first, grad_scale_ptr, tensor_seed,
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
            else:
                _sgd_block(param_ptr, grad_ptr, buf_ptr, master_ptr, offsets, offsets < numel, lr, momentum,
                           one_minus_dampening, weight_decay, first, grad_scale_ptr, tensor_seed,
                           HAS_MOMENTUM, NESTEROV, MAXIMIZE, HAS_GRAD_SCALE, HAS_MASTER, STOCHASTIC_ROUNDING)
    if HAS_STEP:
        advance_steps(counter_ptr, step_base_ptr, offsets_ptr, STEP, n_tensors, skipped, BLOCK)


_sgd_f64_kernel = float64_variant(_sgd_kernel, ("lr", "momentum", "one_minus_dampening", "weight_decay"))


def sgd_(plan, step_args, *, lr, momentum, dampening, weight_decay, nesterov, maximize, has_step, first_step,
         has_master, stochastic_rounding):
    """Launch one SGD step over ``plan`` (roles ``ROLES``). With ``has_step`` each tensor's
    ``step`` says whether its momentum buffer is new (0: ``buf = d_p``) and is advanced by the
    kernel; without, ``first_step`` says it for every tensor."""
    _launch.launch_step(_sgd_kernel, _sgd_f64_kernel, plan, step_args, lr,
                        (momentum, 1.0 - dampening, weight_decay, int(first_step)),
                        dict(HAS_MOMENTUM=momentum != 0, HAS_STEP=has_step, NESTEROV=nesterov, MAXIMIZE=maximize),
                        has_master=has_master, stochastic_rounding=stochastic_rounding)
