"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), every tensor of a
group in one launch, as lion-pytorch's ``Lion``:

    c_t = β1 m_{t-1} + (1 - β1) g_t
    W_t = W_{t-1} (1 - η λ) - η sign(c_t)
    m_t = β2 m_{t-1} + (1 - β2) g_t

The update is the sign of an interpolation, so every element moves by exactly η (or not at all):
Lion keeps one state, and no ``step``. Bytes per element (fp32): read W, g, m; write W, m = 20.
"""

import triton
import triton.language as tl

from ._multi_tensor import Algorithm, load_compute, load_grad, load_param, step_flags, store_as, store_param

ROLES = ("param", "grad", "exp_avg", "master")
HYPER = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "weight_decay")
LionFlags = step_flags("LionFlags", "", __name__)


@triton.jit
def _lion_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, exp_avg_ptr, master_ptr = ptrs
    beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay = hyper
    w = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    m = load_compute(exp_avg_ptr + offsets, mask)
    c = beta1 * m + one_minus_beta1 * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, c * 0.0))  # (c · 0: NaN stays NaN, as torch's sgn)
    w = w * (1.0 - lr * weight_decay) - lr * sign
    store_as(exp_avg_ptr + offsets, beta2 * m + one_minus_beta2 * g, mask)
    store_param(param_ptr, master_ptr, offsets, mask, w, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, beta1, beta2, weight_decay, maximize):
    beta1, beta2 = float(beta1), float(beta2)
    return (dict(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                 weight_decay=weight_decay), dict(maximize=maximize))


def _states(options) -> tuple:
    return ("exp_avg",)


def _no_step(options) -> bool:
    return False


LION = Algorithm(ROLES, HYPER, _lion_update, LionFlags, _hyperparameters, states=_states, uses_step=_no_step,
                 complex_params=False)
