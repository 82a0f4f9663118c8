"""Functional forms of gpuopt's fused steps, on lists of tensors whose state the caller owns
(like ``torch.optim``'s functional API). Each call launches one kernel per group of tensors that
share (device, dtypes).

Common keyword arguments:
    grad_scale, found_inf: AMP's device tensors (gradients divided by ``grad_scale`` in the kernel;
        the step is skipped on the device when ``found_inf`` is nonzero).
    master_params: fp32 copies of bf16/fp16 params, updated and rounded back in the same pass.
    stochastic_rounding: round bf16 params stochastically (no master copy).
    state_steps: one-element float32 tensors on the parameters' device, incremented by the kernel.
"""

from __future__ import annotations

from ._fused import StepArgs, bucket_precision, check_tensors, launch_grouped, log_of, matching_layout
from .kernels import adadelta as adadelta_kernel
from .kernels import adagrad as adagrad_kernel
from .kernels import adam as adam_kernel
from .kernels import rmsprop as rmsprop_kernel
from .kernels import sgd as sgd_kernel


def _prepare(name, params, grads, grad_scale, found_inf, seed):
    check_tensors(name, params, grads)
    grads = [matching_layout(g, p) for g, p in zip(grads, params)]
    device = params[0].device
    return grads, StepArgs(device, None if grad_scale is None else grad_scale.to(device),
                           None if found_inf is None else found_inf.to(device), seed)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, amsgrad=False,
         beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.0, eps=1e-8, maximize=False,
         eps_inside_sqrt=False, decoupled_weight_decay=False, master_params=None,
         stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0, _plans=None, _key=None):
    """One Adam step (AdamW with ``decoupled_weight_decay=True``); see :class:`gpuopt.Adam`.
    ``max_exp_avg_sqs`` may be ``None`` unless ``amsgrad``."""
    if not params:
        return
    grads, step_args = _prepare("AdamW" if decoupled_weight_decay else "Adam", params, grads,
                                grad_scale, found_inf, seed)
    roles = dict(param=params, grad=grads, step=state_steps, exp_avg=exp_avgs, exp_avg_sq=exp_avg_sqs,
                 max_exp_avg_sq=max_exp_avg_sqs if amsgrad else None, master=master_params)

    def launch(plan):
        has_master, sr = bucket_precision(plan, adam_kernel.ROLES.index("master"), master_params is not None, stochastic_rounding)
        adam_kernel.adam_(plan, step_args, lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1,
                          log_beta1=log_of(beta1), beta2=beta2, one_minus_beta2=1.0 - beta2,
                          log_beta2=log_of(beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                          maximize=maximize, decoupled=decoupled_weight_decay,
                          eps_inside_sqrt=eps_inside_sqrt, has_master=has_master, stochastic_rounding=sr)

    launch_grouped(roles, adam_kernel.ROLES, launch, plans=_plans, key=_key, trusted=_plans is not None)


def adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, weight_decay=1e-2, **kwargs):
    """One AdamW step (decoupled weight decay); see :class:`gpuopt.AdamW`."""
    adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, weight_decay=weight_decay,
         decoupled_weight_decay=True, **kwargs)


def sgd(params, grads, momentum_buffers, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
        nesterov=False, maximize=False, first_step=False, master_params=None, stochastic_rounding=False,
        grad_scale=None, found_inf=None, seed=0, _plans=None, _key=None):
    """One SGD step; see :class:`gpuopt.SGD`. ``momentum_buffers`` are tensors (ignored when
    ``momentum == 0``, may be ``None`` then); ``first_step=True`` sets ``buf = d_p`` as PyTorch
    does when a buffer is new."""
    if not params:
        return
    grads, step_args = _prepare("SGD", params, grads, grad_scale, found_inf, seed)
    roles = dict(param=params, grad=grads, momentum_buffer=momentum_buffers if momentum != 0 else None,
                 master=master_params)

    def launch(plan):
        has_master, sr = bucket_precision(plan, sgd_kernel.ROLES.index("master"), master_params is not None, stochastic_rounding)
        sgd_kernel.sgd_(plan, step_args, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, first_step=first_step, has_master=has_master,
                        stochastic_rounding=sr)

    launch_grouped(roles, sgd_kernel.ROLES, launch, plans=_plans, key=_key, trusted=_plans is not None)


def rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, *, lr=1e-2, alpha=0.99,
            eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False, eps_inside_sqrt=False,
            master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None, seed=0,
            _plans=None, _key=None):
    """One RMSprop step (the seed's "adadelta" with ``eps_inside_sqrt=True``); see :class:`gpuopt.RMSprop`.
    ``grad_avgs`` may be ``None`` unless ``centered``, ``momentum_buffers`` unless ``momentum > 0``."""
    if not params:
        return
    grads, step_args = _prepare("RMSprop", params, grads, grad_scale, found_inf, seed)
    roles = dict(param=params, grad=grads, step=state_steps, square_avg=square_avgs,
                 grad_avg=grad_avgs if centered else None,
                 momentum_buffer=momentum_buffers if momentum > 0 else None, master=master_params)

    def launch(plan):
        has_master, sr = bucket_precision(plan, rmsprop_kernel.ROLES.index("master"), master_params is not None, stochastic_rounding)
        rmsprop_kernel.rmsprop_(plan, step_args, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                momentum=momentum, centered=centered, maximize=maximize,
                                eps_inside_sqrt=eps_inside_sqrt, has_master=has_master, stochastic_rounding=sr)

    launch_grouped(roles, rmsprop_kernel.ROLES, launch, plans=_plans, key=_key, trusted=_plans is not None)


def adagrad(params, grads, state_sums, state_steps, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
            maximize=False, master_params=None, stochastic_rounding=False, grad_scale=None, found_inf=None,
            seed=0, _plans=None, _key=None):
    """One Adagrad step; see :class:`gpuopt.Adagrad`."""
    if not params:
        return
    grads, step_args = _prepare("Adagrad", params, grads, grad_scale, found_inf, seed)
    roles = dict(param=params, grad=grads, step=state_steps, sum=state_sums, master=master_params)

    def launch(plan):
        has_master, sr = bucket_precision(plan, adagrad_kernel.ROLES.index("master"), master_params is not None, stochastic_rounding)
        adagrad_kernel.adagrad_(plan, step_args, lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                                maximize=maximize, has_master=has_master, stochastic_rounding=sr)

    launch_grouped(roles, adagrad_kernel.ROLES, launch, plans=_plans, key=_key, trusted=_plans is not None)


def adadelta(params, grads, square_avgs, acc_deltas, state_steps, *, lr=1.0, rho=0.9, eps=1e-6,
             weight_decay=0.0, maximize=False, master_params=None, stochastic_rounding=False,
             grad_scale=None, found_inf=None, seed=0, _plans=None, _key=None):
    """One Adadelta (Zeiler) step; see :class:`gpuopt.Adadelta`."""
    if not params:
        return
    grads, step_args = _prepare("Adadelta", params, grads, grad_scale, found_inf, seed)
    roles = dict(param=params, grad=grads, step=state_steps, square_avg=square_avgs, acc_delta=acc_deltas,
                 master=master_params)

    def launch(plan):
        has_master, sr = bucket_precision(plan, adadelta_kernel.ROLES.index("master"), master_params is not None, stochastic_rounding)
        adadelta_kernel.adadelta_(plan, step_args, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                  maximize=maximize, has_master=has_master, stochastic_rounding=sr)

    launch_grouped(roles, adadelta_kernel.ROLES, launch, plans=_plans, key=_key, trusted=_plans is not None)


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
    from ._batch_norm import batch_norm as _batch_norm

    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       eps_inside_sqrt=eps_inside_sqrt, num_batches_tracked=num_batches_tracked)
