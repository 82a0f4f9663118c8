"""Adam and AdamW (seed B.0.1.4), every tensor of a group in one launch.

    m_t = β1 m_{t-1} + (1 - β1) g_t
    v_t = β2 v_{t-1} + (1 - β2) g_t²
    m̂_t = m_t / (1 - β1^t),  v̂_t = v_t / (1 - β2^t)
    W_t = W_{t-1} - η m̂_t / (sqrt(v̂_t) + ε)        (PyTorch; EPS_INSIDE_SQRT=False)
    W_t = W_{t-1} - η m̂_t / sqrt(v̂_t + ε)          (the seed; EPS_INSIDE_SQRT=True)

Adam adds ``λ W`` to the gradient; AdamW (DECOUPLED) multiplies W by ``1 - η λ`` first. AMSGrad
uses ``max(v̂)`` so far in place of v̂. Bytes per element (fp32): read W, g, m, v; write W, m, v = 28.
"""

import triton
import triton.language as tl

from .. import _launch
from ._multi_tensor import (add_weight_decay, advance_steps, float64_variant, hyper, load_compute, load_grad,
                            load_param, one_minus_pow, scalar, schedule_entry, step_is_skipped, store_as, store_param,
                            tensor_ptr)

ROLES = ("param", "grad", "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
PARAM, GRAD, STEP, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, MASTER = (tl.constexpr(i) for i in range(len(ROLES)))  # rows of the offsets table


@triton.jit
def _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                offsets, mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                bias_correction1, bias_correction2, grad_scale_ptr, seed,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
                EPS_INSIDE_SQRT: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    w = load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE)
    if DECOUPLED:
        w = w * (1.0 - lr * weight_decay)
    else:
        g = add_weight_decay(g, w, weight_decay)
    m = beta1 * load_compute(exp_avg_ptr + offsets, mask) + one_minus_beta1 * g
    v = beta2 * load_compute(exp_avg_sq_ptr + offsets, mask) + one_minus_beta2 * g * g
    store_as(exp_avg_ptr + offsets, m, mask)
    store_as(exp_avg_sq_ptr + offsets, v, mask)
    if AMSGRAD:
        v = tl.maximum(load_compute(max_exp_avg_sq_ptr + offsets, mask), v)
        store_as(max_exp_avg_sq_ptr + offsets, v, mask)
    if EPS_INSIDE_SQRT:
        denom = tl.sqrt(v / bias_correction2 + eps)
    else:
        denom = tl.sqrt(v) / tl.sqrt(bias_correction2) + eps
    w = w - (lr / bias_correction1) * m / denom
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, HAS_MASTER, STOCHASTIC_ROUNDING)


@triton.jit
def _adam_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                 param_base_ptr, grad_base_ptr, step_base_ptr, exp_avg_base_ptr, exp_avg_sq_base_ptr,
                 max_exp_avg_sq_base_ptr, master_base_ptr, counter_ptr,
                 lr, lr_ptr, beta1, one_minus_beta1, log_beta1,
                 beta2, one_minus_beta2, log_beta2, eps,
                 weight_decay, grad_scale_ptr, found_inf_ptr, seed,
                 LR_ON_DEVICE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                 DECOUPLED: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base_ptr)
    beta1, one_minus_beta1 = hyper(beta1, param_base_ptr), hyper(one_minus_beta1, param_base_ptr)
    beta2, one_minus_beta2 = hyper(beta2, param_base_ptr), hyper(one_minus_beta2, param_base_ptr)
    log_beta1, log_beta2 = hyper(log_beta1, param_base_ptr), hyper(log_beta2, param_base_ptr)
    eps, weight_decay = hyper(eps, param_base_ptr), hyper(weight_decay, param_base_ptr)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            step = tl.load(tensor_ptr(step_base_ptr, offsets_ptr, STEP, t, n_tensors, ALIGNED)).to(lr.dtype) + 1.0
            bias_correction1 = one_minus_pow(log_beta1, step)
            bias_correction2 = one_minus_pow(log_beta2, step)
            param_ptr = tensor_ptr(param_base_ptr, offsets_ptr, PARAM, t, n_tensors, ALIGNED)
            grad_ptr = tensor_ptr(grad_base_ptr, offsets_ptr, GRAD, t, n_tensors, ALIGNED)
            exp_avg_ptr = tensor_ptr(exp_avg_base_ptr, offsets_ptr, EXP_AVG, t, n_tensors, ALIGNED)
            exp_avg_sq_ptr = tensor_ptr(exp_avg_sq_base_ptr, offsets_ptr, EXP_AVG_SQ, t, n_tensors, ALIGNED)
            max_exp_avg_sq_ptr = tensor_ptr(max_exp_avg_sq_base_ptr, offsets_ptr, MAX_EXP_AVG_SQ, t, n_tensors, ALIGNED)
            master_ptr = tensor_ptr(master_base_ptr, offsets_ptr, MASTER, t, n_tensors, ALIGNED)
            tensor_seed = seed + t * 7919 + step.to(tl.int32) * 104729  # fresh noise per tensor and step
            if full:
                _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                            offsets, None, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                            weight_decay, bias_correction1, bias_correction2, grad_scale_ptr, tensor_seed,
                            AMSGRAD, MAXIMIZE, DECOUPLED, EPS_INSIDE_SQRT, HAS_GRAD_SCALE, HAS_MASTER,
                            STOCHASTIC_ROUNDING)
            else:
                _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
                            offsets, offsets < numel, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                            weight_decay, bias_correction1, bias_correction2, grad_scale_ptr, tensor_seed,
                            AMSGRAD, MAXIMIZE, DECOUPLED, EPS_INSIDE_SQRT, HAS_GRAD_SCALE, HAS_MASTER,
                            STOCHASTIC_ROUNDING)
    advance_steps(counter_ptr, step_base_ptr, offsets_ptr, STEP, n_tensors, skipped, BLOCK)


_adam_f64_kernel = float64_variant(_adam_kernel, ("lr", "beta1", "one_minus_beta1", "log_beta1", "beta2",
                                                  "one_minus_beta2", "log_beta2", "eps", "weight_decay"))


def adam_(plan, step_args, *, lr, beta1, one_minus_beta1, log_beta1, beta2, one_minus_beta2, log_beta2,
          eps, weight_decay, amsgrad, maximize, decoupled, eps_inside_sqrt, has_master, stochastic_rounding):
    """Launch one Adam/AdamW step over ``plan`` (roles ``ROLES``). ``step_args`` holds the shared
    step arguments (see ``gpuopt._fused.StepArgs``)."""
    _launch.launch_step(_adam_kernel, _adam_f64_kernel, plan, step_args, lr,
                        (beta1, one_minus_beta1, log_beta1, beta2, one_minus_beta2, log_beta2, eps, weight_decay),
                        dict(AMSGRAD=amsgrad, MAXIMIZE=maximize, DECOUPLED=decoupled, EPS_INSIDE_SQRT=eps_inside_sqrt),
                        has_master=has_master, stochastic_rounding=stochastic_rounding)
