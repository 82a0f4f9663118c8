"""Functional forms of gpuopt's fused steps, on lists of tensors whose state the caller owns
(like ``torch.optim``'s functional API). Each call launches one kernel per group of tensors that
share (device, dtypes).

Common keyword arguments:
    grad_scale, found_inf: AMP's device tensors (gradients divided by ``grad_scale`` in the kernel;
        the step is skipped on the device when ``found_inf`` is nonzero).
    master_params: fp32 copies of bf16/fp16 params, updated and rounded back in the same pass.
    stochastic_rounding: round bf16 params stochastically (no master copy). The noise mixes
        ``seed`` with each tensor's index and ``step`` (0 without one): a step-less call (SGD
        without momentum) draws the same noise for the same ``seed``, so vary ``seed`` per call
        (the optimizer classes keep an epoch on the device instead).
    state_steps: one-element float32 tensors on the parameters' device, incremented by the kernel.

Every call checks every tensor against what the kernel assumes (``gpuopt._validate``): states
with their parameter's shape, strides, device and a floating-point dtype, nothing misaligned,
nothing written twice. Errors are raised before anything is modified.

Arrays work as well as tensors: CuPy arrays on a GPU, NumPy arrays on the CPU (through Triton's
interpreter), anything ``torch.from_dlpack`` views. They are updated in place, with no copy, on
the caller's current CuPy stream, and ``batch_norm`` returns an array of the caller's kind
(``gpuopt._arrays``).
"""

from __future__ import annotations

import torch

from ._adafactor import TilePlan
from ._arrays import accepts_arrays
from ._batch_norm import batch_norm as _batch_norm
from ._batch_norm import batch_norm_backward as _batch_norm_backward
from ._batch_norm import batch_norm_forward as _batch_norm_forward
from ._multi_tensor import run_functional
from ._muon import Orthogonalizer
from .kernels import adadelta as adadelta_kernel
from .kernels import adafactor as adafactor_kernel
from .kernels import adagrad as adagrad_kernel
from .kernels import adam as adam_kernel
from .kernels import lamb as lamb_kernel
from .kernels import lars as lars_kernel
from .kernels import lion as lion_kernel
from .kernels import muon as muon_kernel
from .kernels import rmsprop as rmsprop_kernel
from .kernels import schedule_free as schedule_free_kernel
from .kernels import sgd as sgd_kernel


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad=False,
         beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False,
         eps_inside_sqrt=False, decoupled_weight_decay=False, master_params=None,
         stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One Adam step (AdamW with ``decoupled_weight_decay=True``); see :class:`gpuopt.Adam`.
    ``max_exp_avg_sqs`` may be ``None`` unless ``amsgrad``."""
    roles = dict(param=params, grad=grads, step=state_steps, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                 max_exp_avg_sq=max_exp_avg_sqs if amsgrad else None, master=master_params)
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                   eps_inside_sqrt=eps_inside_sqrt, decoupled_weight_decay=decoupled_weight_decay)
    run_functional("AdamW" if decoupled_weight_decay else "Adam", adam_kernel.ADAM, roles, options, lr=lr,
                   grad_scale=grad_scale, found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, weight_decay=1e-2, **kwargs):
    """One AdamW step (decoupled weight decay); see :class:`gpuopt.AdamW`."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kwargs)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def sgd(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
        nesterov=False, maximize=False, first_step=False, state_steps=None, master_params=None,
        stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One SGD step; see :class:`gpuopt.SGD`. ``momentum_buffers`` are tensors (ignored when
    ``momentum == 0``, may be ``None`` then). A new buffer takes ``buf = d_p`` as PyTorch's first
    step does: for the tensors whose ``state_steps`` entry (one-element float32 device tensors,
    advanced by the kernel unless AMP skips the step) is 0, or, without ``state_steps``, for all
    of them when ``first_step=True``."""
    has_momentum = momentum != 0
    roles = dict(param=params, grad=grads, step=state_steps if has_momentum else None,
                 momentum_buffer=momentum_buffers if has_momentum else None, master=master_params)
    options = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                   maximize=maximize, has_step=roles["step"] is not None, first_step=first_step)
    run_functional("SGD", sgd_kernel.SGD, roles, options, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                   seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr=1e-2, alpha=0.99,
            eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False, eps_inside_sqrt=False,
            master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One RMSprop step (the seed's "adadelta" with ``eps_inside_sqrt=True``); see :class:`gpuopt.RMSprop`.
    ``grad_avgs`` may be ``None`` unless ``centered``, ``momentum_buffers`` unless ``momentum > 0``."""
    roles = dict(param=params, grad=grads, step=state_steps, square_avg=square_avgs,
                 grad_avg=grad_avgs if centered else None,
                 momentum_buffer=momentum_buffers if momentum > 0 else None, master=master_params)
    options = dict(alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                   maximize=maximize, eps_inside_sqrt=eps_inside_sqrt)
    run_functional("RMSprop", rmsprop_kernel.RMSPROP, roles, options, lr=lr, grad_scale=grad_scale,
                   found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adagrad(params, grads, state_sums, state_steps, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
            maximize=False, master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None,
            seed=0):
    """One Adagrad step; see :class:`gpuopt.Adagrad`."""
    roles = dict(param=params, grad=grads, step=state_steps, sum=state_sums, master=master_params)
    options = dict(lr_decay=lr_decay, eps=eps, weight_decay=weight_decay, maximize=maximize)
    run_functional("Adagrad", adagrad_kernel.ADAGRAD, roles, options, lr=lr, grad_scale=grad_scale,
                   found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adadelta(params, grads, square_avgs, acc_deltas, state_steps, *, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False, master_params=None, stochastic_rounding=False,
             grad_scale=None, found_inf=None, seed=0):
    """One Adadelta (Zeiler) step; see :class:`gpuopt.Adadelta`."""
    roles = dict(param=params, grad=grads, step=state_steps, square_avg=square_avgs, acc_delta=acc_deltas,
                 master=master_params)
    options = dict(rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    run_functional("Adadelta", adadelta_kernel.ADADELTA, roles, options, lr=lr, grad_scale=grad_scale,
                   found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def lion(params, grads, exp_avgs, *, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
         master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One Lion step; see :class:`gpuopt.Lion` (``weight_decay`` as the kernel applies it:
    ``W ← W (1 - lr λ)``)."""
    roles = dict(param=params, grad=grads, exp_avg=exp_avgs, master=master_params)
    options = dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)
    run_functional("Lion", lion_kernel.LION, roles, options, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                   seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def lamb(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6,
         weight_decay=0.0, bias_correction=True, max_trust_ratio=None, maximize=False, master_params=None,
         stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One LAMB step; see :class:`gpuopt.LAMB` (two launches per group: the norms, then the update)."""
    roles = dict(param=params, grad=grads, step=state_steps, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                 master=master_params)
    options = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                   max_trust_ratio=max_trust_ratio, maximize=maximize)
    run_functional("LAMB", lamb_kernel.LAMB, roles, options, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                   seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def lars(params, grads, momentum_buffers, state_steps, *, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
         eps=1e-8, maximize=False, master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None,
         seed=0):
    """One LARS step; see :class:`gpuopt.LARS`. With momentum, ``state_steps`` (one-element float32
    tensors) say which buffers are new (0: ``buf = d``); both may be ``None`` when ``momentum == 0``."""
    has_momentum = momentum != 0
    roles = dict(param=params, grad=grads, step=state_steps if has_momentum else None,
                 momentum_buffer=momentum_buffers if has_momentum else None, master=master_params)
    options = dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                   maximize=maximize)
    run_functional("LARS", lars_kernel.LARS, roles, options, lr=lr, grad_scale=grad_scale, found_inf=found_inf,
                   seed=seed, stochastic_rounding=stochastic_rounding)


def muon(params, grads, momentum_buffers, *, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
         ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, maximize=False,
         master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0):
    """One Muon step of 2-D ``params``; see :class:`gpuopt.Muon`: the momentum launch, the batched
    Newton–Schulz orthogonalization (``gpuopt._muon``), the weight-update launch."""
    if not params:
        return
    work = Orthogonalizer("Muon", params, adjust_lr_fn, master_params)
    roles = dict(param=params, grad=grads, momentum_buffer=momentum_buffers, update=work.updates)
    run_functional("Muon", muon_kernel.MOMENTUM, roles, dict(momentum=momentum, nesterov=nesterov, maximize=maximize),
                   lr=lr, grad_scale=grad_scale, found_inf=found_inf, seed=seed, stochastic_rounding=False)
    work.orthogonalize_(ns_coefficients, ns_steps, eps)
    run_functional("Muon", muon_kernel.UPDATE, work.update_roles, dict(weight_decay=weight_decay), lr=lr,
                   grad_scale=None, found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adamw_schedule_free(params, grads, zs, exp_avg_sqs, *, lr, ckp1, step, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.0, maximize=False, master_params=None, stochastic_rounding=False,
                        grad_scale=None, found_inf=None, seed=0):
    """One Schedule-Free AdamW step in training mode; see :class:`gpuopt.AdamWScheduleFree`. The
    caller keeps the schedule: ``lr`` is this step's scheduled rate, ``ckp1`` its averaging weight
    ``w_t / Σ w`` and ``step`` its number (from 1), as schedulefree works them out."""
    roles = dict(param=params, grad=grads, z=zs, exp_avg_sq=exp_avg_sqs, master=master_params)
    lr = float(lr)
    options = dict(beta2=beta2, bias_correction2=1.0 - beta2 ** step, eps=eps, weight_decay=weight_decay, ckp1=ckp1,
                   y_rate=lr * (beta1 * (1.0 - ckp1) - 1.0), z_rate=lr, maximize=maximize)
    run_functional("AdamWScheduleFree", schedule_free_kernel.SCHEDULE_FREE, roles, options, lr=lr,
                   grad_scale=grad_scale, found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding)


@accepts_arrays(read=("grads", "grad_scale", "found_inf", "lr"))
def adafactor(params, grads, row_vars, col_vars, variances, state_steps, *, lr=1e-2, beta2_decay=-0.8, eps1=None,
              eps2=1e-3, d=1.0, weight_decay=0.0, maximize=False, master_params=None, stochastic_rounding=False,
              grad_scale=None, found_inf=None, seed=0):
    """One Adafactor step; see :class:`gpuopt.Adafactor` (three launches per group). As in
    ``torch.optim.adafactor``: ``row_vars`` / ``col_vars`` hold the factors of parameters of 2+
    dims (shapes ``[..., R, 1]`` and ``[..., 1, C]``, contiguous) and ``None`` for the others,
    ``variances`` the reverse; ``eps1=None`` is the machine epsilon of ``params[0]``'s dtype."""
    if eps1 is None and params:
        eps1 = torch.finfo(params[0].dtype).eps
    # (a parameter without a state: its other state stands in; the kernels never touch it)
    row_vars = [variance if row is None else row for row, variance in zip(row_vars, variances)]
    col_vars = [variance if column is None else column for column, variance in zip(col_vars, variances)]
    variances = [row if variance is None else variance for variance, row in zip(variances, row_vars)]
    roles = dict(param=params, grad=grads, step=state_steps, row_var=row_vars, col_var=col_vars, variance=variances,
                 master=master_params)
    options = dict(beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay, maximize=maximize)
    run_functional("Adafactor", adafactor_kernel.ADAFACTOR, roles, options, lr=lr, grad_scale=grad_scale,
                   found_inf=found_inf, seed=seed, stochastic_rounding=stochastic_rounding, plan_type=TilePlan)


@accepts_arrays(read=("input", "weight", "bias"))
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, eps_inside_sqrt=True, num_batches_tracked=None):
    """``torch.nn.functional.batch_norm`` on gpuopt's kernels, differentiable (closed-form backward).

    Same arguments and semantics as torch's: ``input`` is (N, C, ...) with at least 2 dimensions,
    contiguous or channels-last (kept in the output); fp32, bf16, fp16 (statistics in fp32) or
    fp64; ``weight``/``bias``/running stats have C elements, in the input's dtype or fp32. In
    training the batch's statistics normalize and the running stats (if given) are updated in
    place with ``momentum``; otherwise the running stats normalize.

    Extra keyword arguments:
        eps_inside_sqrt: True (default, PyTorch) normalizes by sqrt(σ² + ε); False by σ + ε, as
            the seed writes it, with that forward's exact gradient.
        num_batches_tracked: the module's counter, already counting this batch; with
            ``momentum=None`` the running stats become the cumulative average (factor 1/t, read on
            the device).
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       eps_inside_sqrt=eps_inside_sqrt, num_batches_tracked=num_batches_tracked)


@accepts_arrays(read=("input", "weight", "bias"))
def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                       eps=1e-5, *, eps_inside_sqrt=True, num_batches_tracked=None):
    """``batch_norm``'s forward as a plain function (no autograd): ``(output, statistics)``, for
    callers that run the backward themselves (CuPy and NumPy arrays, hand-written training loops;
    as ``torch.ops.aten.native_batch_norm``). Same arguments as ``batch_norm``. ``statistics``:
    in training, the batch's per-channel values the backward needs — a ``(4, C)`` array in the
    accumulation dtype (rows: μ, 1/s, σ, the shift the sums used); ``None`` in evaluation."""
    return _batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps,
                               eps_inside_sqrt, num_batches_tracked)


@accepts_arrays(read=("grad_output", "input", "weight", "statistics", "running_mean", "running_var"))
def batch_norm_backward(grad_output, input, weight, statistics, running_mean=None, running_var=None, eps=1e-5, *,
                        eps_inside_sqrt=True, output_mask=(True, True, True)):
    """The closed-form backward as a plain function: ``(∂L/∂Z, ∂L/∂G, ∂L/∂B)`` given ∂L/∂Ẑ
    (``grad_output``), the forward's ``input``, ``weight`` and ``statistics`` (training), or the
    running statistics the forward normalized with (``statistics=None``: evaluation, ∂L/∂Z = (G/s)
    ∂L/∂Ẑ). ``eps``/``eps_inside_sqrt`` as in the forward; ``output_mask`` says which of the three
    to compute (the others are ``None``), as ``torch.ops.aten.native_batch_norm_backward``."""
    return _batch_norm_backward(grad_output, input, weight, statistics, running_mean, running_var, eps,
                                eps_inside_sqrt, tuple(output_mask))
