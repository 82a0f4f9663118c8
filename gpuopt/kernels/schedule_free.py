"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled"), as the schedulefree
package's ``AdamWScheduleFree``, every tensor of a group in one launch.

In training mode the parameter holds y, where gradients are taken; the state z is the base
sequence and x, the average evaluation uses, is implicit (y = (1 - β1) z + β1 x):

    v = β2 v + (1 - β2) g²
    u = g / (sqrt(v / (1 - β2^t)) + ε) + λ y
    y = y + c (z - y) + η (β1 (1 - c) - 1) u
    z = z - η u

with η the warmup-scheduled learning rate and c = w_t / Σ_s w_s the averaging weight
(w_t = t^r · max η^p), both worked out on the host from the group's counters, as schedulefree
does (``y_rate`` = η (β1 (1 - c) - 1), ``z_rate`` = η). ``train()`` / ``eval()`` move the
parameter between y and x, one launch of ``SWITCH`` each: p = p + w (z - p), with
w = 1 - β1 (to y) or 1 - 1/β1 (to x). Bytes per element: read y, g, z, v; write y, z, v = 28.
"""

import triton
import triton.language as tl

from ._multi_tensor import Algorithm, load_compute, load_grad, load_param, step_flags, store_as, store_param

ROLES = ("param", "grad", "z", "exp_avg_sq", "master")
HYPER = ("beta2", "one_minus_beta2", "bias_correction2", "eps", "weight_decay", "ckp1", "y_rate", "z_rate")
ScheduleFreeFlags = step_flags("ScheduleFreeFlags", "", __name__)


@triton.jit
def _schedule_free_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, grad_ptr, z_ptr, exp_avg_sq_ptr, master_ptr = ptrs
    beta2, one_minus_beta2, bias_correction2, eps, weight_decay, ckp1, y_rate, z_rate = hyper
    y = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
    z = load_compute(z_ptr + offsets, mask)
    v = beta2 * load_compute(exp_avg_sq_ptr + offsets, mask) + one_minus_beta2 * g * g
    store_as(exp_avg_sq_ptr + offsets, v, mask)
    u = g / (tl.sqrt(v / bias_correction2) + eps) + weight_decay * y
    y = y + ckp1 * (z - y) + y_rate * u
    store_as(z_ptr + offsets, z - z_rate * u, mask)
    store_param(param_ptr, master_ptr, offsets, mask, y, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _hyperparameters(*, beta2, bias_correction2, eps, weight_decay, ckp1, y_rate, z_rate, maximize):
    beta2 = float(beta2)
    return (dict(beta2=beta2, one_minus_beta2=1.0 - beta2, bias_correction2=bias_correction2, eps=eps,
                 weight_decay=weight_decay, ckp1=ckp1, y_rate=y_rate, z_rate=z_rate), dict(maximize=maximize))


def _states(options) -> tuple:
    return ("z", "exp_avg_sq")


def _no_step(options) -> bool:
    return False


SCHEDULE_FREE = Algorithm(ROLES, HYPER, _schedule_free_update, ScheduleFreeFlags, _hyperparameters, states=_states,
                          uses_step=_no_step)

SWITCH_ROLES = ("param", "z", "master")
SWITCH_HYPER = ("weight",)
SwitchFlags = step_flags("SwitchFlags", "", __name__)


@triton.jit
def _switch_update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS: tl.constexpr):
    param_ptr, z_ptr, master_ptr = ptrs
    (weight,) = hyper
    p = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
    p = p + weight * (load_compute(z_ptr + offsets, mask) - p)
    store_param(param_ptr, master_ptr, offsets, mask, p, seed, FLAGS.has_master, FLAGS.stochastic_rounding)


def _switch_hyperparameters(*, weight):
    return dict(weight=weight), dict(maximize=False)


SWITCH = Algorithm(SWITCH_ROLES, SWITCH_HYPER, _switch_update, SwitchFlags, _switch_hyperparameters,
                   uses_step=_no_step)
