"""gpuopt's optimizers: ``torch.optim`` drop-ins whose step is one fused kernel launch per group.

Constructor arguments, defaults, param groups, ``state_dict`` keys and checks are PyTorch's, so a
checkpoint moves between ``torch.optim.X`` and ``gpuopt.X`` in both directions. ``foreach`` and
``fused`` are accepted for compatibility and ignored (every step is fused); ``capturable=True``
is accepted and always honoured: steps live on the device and nothing synchronises with the host.

Extra keyword-only options on every class (see :class:`gpuopt._fused.FusedOptimizer`):
``state_dtype``, ``master_weights``, ``stochastic_rounding``; and on Adam, AdamW and RMSprop
``eps_inside_sqrt`` for the seed's exact equations.
"""

from __future__ import annotations

import torch

from ._adafactor import TilePlan
from ._distributed import local_roles
from ._fused import FusedOptimizer, validate_common, validate_precision
from ._launch import launch_step
from ._multi_tensor import prepare_buckets, step_options
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


def _validate_tensor_options(lr, betas, foreach, capturable):
    """torch.optim.Adam's checks of tensor ``lr`` / ``betas``, with its messages. gpuopt reads
    tensor options with any settings, but refuses what torch refuses: code moves both ways."""
    if isinstance(lr, torch.Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, torch.Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if foreach and not capturable:
                raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")


def _validate_betas(betas):
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def _precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable, differentiable,
                        foreach, fused, maximize):
    validate_precision(state_dtype, differentiable)
    return dict(state_dtype=state_dtype, master_weights=master_weights,
                stochastic_rounding=stochastic_rounding, capturable=capturable,
                differentiable=differentiable, foreach=foreach, fused=fused, maximize=maximize)


class Adam(FusedOptimizer):
    r"""Adam (seed B.0.1.4) as a fused ``torch.optim.Adam`` drop-in.

    PyTorch's update (default)::

        m = β1 m + (1-β1) g;   v = β2 v + (1-β2) g²
        W ← W - lr · m/(1-β1^t) / ( sqrt(v/(1-β2^t)) + ε )

    The seed's update (``eps_inside_sqrt=True``)::

        W ← W - lr · m̂ / sqrt(v̂ + ε),   m̂ = m/(1-β1^t),  v̂ = v/(1-β2^t)

    ``weight_decay`` adds ``λ W`` to the gradient (L2); ``decoupled_weight_decay=True`` gives AdamW.
    ``amsgrad`` uses the running maximum of v̂. State keys: ``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (amsgrad), and ``master_param`` with ``master_weights=True``.

    Example::

        opt = gpuopt.Adam(model.parameters(), lr=1e-3)     # was: torch.optim.Adam(...)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, eps_inside_sqrt=False, state_dtype=None,
                 master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        _validate_tensor_options(lr, betas, foreach, capturable)
        _validate_betas(betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        decoupled_weight_decay=decoupled_weight_decay, eps_inside_sqrt=eps_inside_sqrt,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = adam_kernel.ADAM

    def _options(self, group):
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"], eps_inside_sqrt=group["eps_inside_sqrt"],
                    decoupled_weight_decay=group["decoupled_weight_decay"])


class AdamW(Adam):
    r"""AdamW as a fused ``torch.optim.AdamW`` drop-in: Adam with decoupled weight decay,
    ``W ← W (1 - lr λ)`` before the Adam update (default ``weight_decay=1e-2``). Everything else,
    including ``eps_inside_sqrt=True`` for the seed's ``m̂ / sqrt(v̂ + ε)``, is as :class:`Adam`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 eps_inside_sqrt=False, state_dtype=None, master_weights=False, stochastic_rounding=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, eps_inside_sqrt=eps_inside_sqrt,
                         state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)


class _MomentumBuffer:
    """The state of SGD-style momentum (SGD, LARS): ``momentum_buffer``, and ``step``, a float32
    device scalar torch's SGD does not keep: 0 marks a buffer no step has written yet (new, or its
    first step skipped by AMP's ``found_inf`` on the device), so the kernel knows when to take the
    first step's ``buf = d``. A checkpoint's buffer without it loads as one in use."""

    def _complete_state(self, state, p, group):
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            # A new buffer: its step 0 makes the kernel set buf = d, the first step's, until a
            # step really runs (an AMP-skipped one leaves it at 0).
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        super()._complete_state(state, p, group)

    def _required_state(self, group, p) -> tuple:
        return tuple(key for key in super()._required_state(group, p) if key != "step")  # torch's SGD keeps none

    def _after_load(self, state, p, group):
        if state.get("momentum_buffer") is not None and "step" not in state:  # torch.optim.SGD's: in use
            state["step"] = torch.ones((), dtype=torch.float32, device=p.device)
        super()._after_load(state, p, group)


class SGD(_MomentumBuffer, FusedOptimizer):
    r"""SGD with momentum (seed B.0.1.2) as a fused ``torch.optim.SGD`` drop-in::

        d_p = g + λ W;  buf = μ buf + (1 - dampening) d_p  (buf = d_p at its first step)
        W ← W - lr (d_p + μ buf  if nesterov  else  buf)

    The seed's V-form ``V = γV + η∇J, W -= V`` is ``momentum=γ, lr=η, dampening=0`` (``V = lr·buf``);
    its M-form with step η′ is ``lr = η′(1-γ)``. State keys (when momentum ≠ 0): ``momentum_buffer``
    as torch's, and ``step``, a float32 device scalar torch's SGD does not keep: 0 marks a buffer
    no step has written yet (new, or its first step skipped by AMP's ``found_inf`` on the device),
    so the kernel knows when to take PyTorch's first-step ``buf = d_p``. A torch checkpoint's buffer
    loads as one in use; torch ignores the extra key.

    Example::

        opt = gpuopt.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, state_dtype=None,
                 master_weights=False, stochastic_rounding=False):
        validate_common(lr, None, weight_decay)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, False,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = sgd_kernel.SGD

    def _options(self, group):
        return dict(momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"], maximize=group["maximize"], has_step=group["momentum"] != 0,
                    first_step=False)


class RMSprop(FusedOptimizer):
    r"""RMSprop — the seed's "adadelta" (B.0.1.3) — as a fused ``torch.optim.RMSprop`` drop-in::

        G = α G + (1-α) g²;   W ← W - lr g / (sqrt(G) + ε)          (PyTorch, default)
        G = α G + (1-α) g²;   W ← W - lr g / sqrt(G + ε)            (the seed: eps_inside_sqrt=True)

    ``centered`` subtracts the squared running mean of g from G; ``momentum`` accumulates
    ``g / avg`` in a buffer. State keys: ``step``, ``square_avg``, ``momentum_buffer``,
    ``grad_avg``. The seed's γ is ``alpha``.
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, fused=None,
                 eps_inside_sqrt=False, state_dtype=None, master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, eps_inside_sqrt=eps_inside_sqrt,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = rmsprop_kernel.RMSPROP

    def _options(self, group):
        return dict(alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"],
                    eps_inside_sqrt=group["eps_inside_sqrt"])


class Adagrad(FusedOptimizer):
    r"""Adagrad as a fused ``torch.optim.Adagrad`` drop-in::

        sum += g²;   W ← W - lr/(1 + (t-1) lr_decay) · g / (sqrt(sum) + ε)

    State keys: ``step``, ``sum`` (starts at ``initial_accumulator_value``).
    """

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, state_dtype=None,
                 master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, False,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)
        # PyTorch makes Adagrad's state at construction; so does gpuopt (state_dict then matches).
        for group in self.param_groups:
            for p in group["params"]:
                self._complete_state(self.state[p], p, group)

    _algorithm = adagrad_kernel.ADAGRAD
    _initial_values = {"sum": "initial_accumulator_value"}

    def _options(self, group):
        return dict(lr_decay=group["lr_decay"], eps=group["eps"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"])


class Adadelta(FusedOptimizer):
    r"""Adadelta (Zeiler's, not the seed's — that one is :class:`RMSprop`) as a fused
    ``torch.optim.Adadelta`` drop-in::

        E[g²] = ρ E[g²] + (1-ρ) g²;   Δ = sqrt(E[Δ²] + ε) / sqrt(E[g²] + ε) · g
        E[Δ²] = ρ E[Δ²] + (1-ρ) Δ²;    W ← W - lr Δ

    State keys: ``step``, ``square_avg``, ``acc_delta``.
    """

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, foreach=None, *, capturable=False,
                 maximize=False, differentiable=False, fused=None, state_dtype=None, master_weights=False,
                 stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = adadelta_kernel.ADADELTA

    def _options(self, group):
        return dict(rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"], maximize=group["maximize"])


class Lion(FusedOptimizer):
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as a fused drop-in
    for lion-pytorch's ``Lion``::

        c = β1 m + (1-β1) g;   W ← W (1 - lr λ) - lr sign(c);   m ← β2 m + (1-β2) g

    State key: ``exp_avg`` (no ``step``), so checkpoints move between ``lion_pytorch.Lion`` and
    ``gpuopt.Lion`` both ways. ``decoupled_weight_decay=True`` divides λ by the constructor's
    ``lr`` (kept in the param group as ``weight_decay_lr``), as lion-pytorch does; ``use_triton``
    is accepted and ignored (every step is one fused launch). Complex parameters are refused: the
    sign of a complex number is not elementwise on its parts.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
                 decoupled_weight_decay=False, *, maximize=False, foreach=None, fused=None, capturable=False,
                 differentiable=False, state_dtype=None, master_weights=False, stochastic_rounding=False):
        validate_common(lr, None, weight_decay)
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, weight_decay_lr=float(lr),
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = lion_kernel.LION

    def _options(self, group):
        weight_decay = group["weight_decay"]
        if group["decoupled_weight_decay"]:
            weight_decay = weight_decay / group["weight_decay_lr"]
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=group["maximize"])


class LAMB(FusedOptimizer):
    r"""LAMB (You et al. 2020) as apex's ``FusedLAMB`` computes it with ``adam_w_mode=True``,
    without its internal gradient clipping (clip with ``opt.clip_grad_norm_``, fused into the step)::

        m = β1 m + (1-β1) g;   v = β2 v + (1-β2) g²
        u = m̂ / (sqrt(v̂) + ε) + λ W              (m̂, v̂ bias-corrected when bias_correction)
        W ← W - lr · r · u,   r = ‖W‖ / ‖u‖ per tensor (1 if either is 0; ≤ max_trust_ratio)

    Two launches per group and step, no host sync: the first updates m, v and the two norms of
    every tensor, the second moves the weights (``gpuopt/kernels/lamb.py``). Under FSDP2 the norms are
    of the whole parameter (summed over its shards' ranks by one all-reduce per group). State
    keys: ``step``, ``exp_avg``, ``exp_avg_sq`` (apex's).

    The trust ratio applies to every tensor, as in the paper and apex's ``use_nvlamb=True``.
    apex's default (``use_nvlamb=False``) skips it in groups whose ``weight_decay`` is 0 (a
    no-decay group of biases and norms then takes plain bias-corrected Adam steps); gpuopt has no
    such switch yet.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *, bias_correction=True,
                 max_trust_ratio=None, maximize=False, foreach=None, fused=None, capturable=False,
                 differentiable=False, state_dtype=None, master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        _validate_betas(betas)
        if max_trust_ratio is not None and not max_trust_ratio > 0.0:
            raise ValueError(f"Invalid max_trust_ratio value: {max_trust_ratio}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_trust_ratio=max_trust_ratio,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = lamb_kernel.LAMB

    def _options(self, group):
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    bias_correction=group["bias_correction"], maximize=group["maximize"],
                    max_trust_ratio=float("inf") if group["max_trust_ratio"] is None else group["max_trust_ratio"])


class LARS(_MomentumBuffer, FusedOptimizer):
    r"""LARS (You et al. 2017): SGD with momentum and a per-tensor learning-rate scale::

        local = tc ‖W‖ / (‖g‖ + λ‖W‖ + ε)  per tensor (1 if ‖W‖ or ‖g‖ is 0)
        buf = μ buf + local (g + λ W)        (buf = local (g + λ W) at the first step)
        W ← W - lr · buf

    Two launches per group and step, no host sync (``gpuopt/kernels/lars.py``); under FSDP2 the norms
    are of the whole parameter. State keys: ``momentum_buffer`` and, as gpuopt's SGD, a ``step``
    that marks a buffer no step has written yet.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8, *,
                 maximize=False, foreach=None, fused=None, capturable=False, differentiable=False, state_dtype=None,
                 master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if trust_coefficient <= 0.0:
            raise ValueError(f"Invalid trust_coefficient value: {trust_coefficient}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    _algorithm = lars_kernel.LARS

    def _options(self, group):
        return dict(momentum=group["momentum"], weight_decay=group["weight_decay"],
                    trust_coefficient=group["trust_coefficient"], eps=group["eps"], maximize=group["maximize"])


class Muon(FusedOptimizer):
    r"""Muon as ``torch.optim.Muon``: the same arguments, state (``momentum_buffer``) and results,
    to the rounding of the bf16 Newton–Schulz iteration torch also runs::

        B ← B + (1-μ)(g - B);   U = g + μ (B - g) if nesterov else B
        W ← W (1 - lr λ) - lr · adjust(shape) · NS(U)

    For 2-D parameters only (hidden layers' weights; embeddings, heads and gains go to AdamW in
    another optimizer, as torch's docs say). A step is one launch for every momentum update of a
    group, one chain of batched matrix products per parameter shape (``gpuopt._muon``), and one
    launch for every weight update. Under FSDP2 the ranks share the orthogonalization: each
    gathers and orthogonalizes every world-th matrix and scatters the results back. The
    orthogonalization runs on the host's schedule (collectives, a batch per shape), so
    ``gpuopt.graphed_step`` refuses Muon and ``torch.compile`` runs its step eagerly.
    """

    _algorithm = muon_kernel.MOMENTUM
    _host_schedule = True  # gpuopt.graphed_step cannot replay it

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None, *,
                 maximize=False, foreach=None, fused=None, capturable=False, differentiable=False,
                 master_weights=False, stochastic_rounding=False, state_dtype=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ["original", "match_rms_adamw"]:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if ns_steps >= 100:
            raise ValueError("Number of steps must be less than 100 for computational efficiency")
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch.optim.Muon's check of every parameter (2-D only), also for groups added later."""
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # (a generator is read once; torch refuses a set)
            param_group["params"] = params = list(params)
        for p in [params] if isinstance(params, torch.Tensor) else params:
            if p.ndim != 2:
                raise ValueError(f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}")
        super().add_param_group(param_group)

    def _reset_host_caches(self):
        super()._reset_host_caches()
        self._orthogonalizers = {}  # group index → _muon.Orthogonalizer of its last preparation

    @torch.compiler.disable
    def step(self, closure=None, **kwargs):
        """One step (``closure``, ``grad_scale``/``found_inf`` as every gpuopt optimizer)."""
        return super().step(closure, **kwargs)

    step.hooked = True  # (torch.optim.Optimizer wraps a step without it)

    def _options(self, group):
        return dict(momentum=group["momentum"], nesterov=group["nesterov"], maximize=group["maximize"])

    def _roles(self, group, params, grads):
        """The momentum launch's tensors, and a new ``Orthogonalizer`` for the group's matrices
        (its bf16 ``updates`` are the launch's ``update`` role)."""
        roles = super()._roles(group, params, grads)
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        work = Orthogonalizer(type(self).__name__, params, group["adjust_lr_fn"], roles.get("master"))
        self._orthogonalizers[index] = work
        roles["update"] = work.updates
        return roles

    def _after_launches(self, prepared_groups, step_args):
        """Per group: orthogonalize its updates, then one launch of the weight update per bucket
        (planned at the first step after each preparation), skipped on the device with the
        momentum launch when AMP's ``found_inf`` (or a non-finite fused clip) says so."""
        for index, (group, prepared) in enumerate(zip(self.param_groups, prepared_groups)):
            work = self._orthogonalizers.get(index)
            if not prepared.buckets or work is None:
                continue
            work.orthogonalize_(group["ns_coefficients"], group["ns_steps"], group["eps"])
            if work.update_buckets is None:
                work.update_buckets = prepare_buckets(type(self).__name__, local_roles(work.update_roles),
                                                      muon_kernel.UPDATE, self._plans, ("update", index),
                                                      group["stochastic_rounding"])
            options = step_options(muon_kernel.UPDATE, dict(weight_decay=group["weight_decay"]))
            for bucket in work.update_buckets:
                plan = bucket.plan
                args = step_args[plan.device]
                launch_step(muon_kernel.UPDATE, bucket, options,
                            self._step_args(plan.device, None, args.found_inf), group["lr"])


class Adafactor(FusedOptimizer):
    r"""Adafactor (Shazeer & Stern 2018) as ``torch.optim.Adafactor``: the same arguments,
    defaults, state keys (``step``, ``row_var`` and ``col_var`` for a parameter of 2+ dims,
    ``variance`` otherwise) and results::

        ρ = min(lr, 1/√t);   α = max(ε2, RMS(W)) ρ;   w = t^beta2_decay
        2+ dims:  r ← lerp(r, mean_C g², w);  c ← lerp(c, mean_R g², w);  V = r c / max(mean_R r, ε1)
        else:     V ← lerp(V, g², w)
        W ← W (1 - lr λ) - α / max(1, RMS(u)/d) · u,   u = g / sqrt(max(V, ε1²))

    factored over the last two dims (the leading ones are a batch of matrices), ``ε1`` ``None``
    the machine epsilon of the group's (first) parameter dtype, as torch's. Three launches per
    group and step, no host sync (torch's for-loop makes three ``.item()`` syncs a parameter):
    the row and column statistics, the norms of W and u, the update
    (``gpuopt/kernels/adafactor.py``). The step runs eagerly under ``torch.compile`` (a graph
    break); ``foreach`` is accepted and ignored. Complex parameters are refused, as torch does.
    """

    _algorithm = adafactor_kernel.ADAFACTOR
    _plan_type = TilePlan

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, *,
                 foreach=None, maximize=False, fused=None, capturable=False, differentiable=False,
                 state_dtype=None, master_weights=False, stochastic_rounding=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    @torch.compiler.disable
    def step(self, closure=None, **kwargs):
        """One step (``closure``, ``grad_scale``/``found_inf`` as every gpuopt optimizer)."""
        return super().step(closure, **kwargs)

    step.hooked = True  # (torch.optim.Optimizer wraps a step without it)

    def _options(self, group):
        eps1, eps2 = group["eps"]
        params = [p for p in group["params"] if isinstance(p, torch.Tensor)]  # (a loaded group lists ids)
        if eps1 is None and params:  # torch's: the machine epsilon of the first parameter stepped
            eps1 = torch.finfo(next((p for p in params if p.grad is not None), params[0]).dtype).eps
        return dict(beta2_decay=group["beta2_decay"], eps1=eps1, eps2=eps2, d=group["d"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"])


class AdamWScheduleFree(FusedOptimizer):
    r"""Schedule-Free AdamW (Defazio et al. 2024) as a fused drop-in for the schedulefree package's
    ``AdamWScheduleFree``: the same arguments, param-group keys (``k``, ``weight_sum``,
    ``lr_max``, ``scheduled_lr``, ``train_mode``, ...) and state keys (``z``, ``exp_avg_sq``),
    and its results step by step (``gpuopt/kernels/schedule_free.py`` has the equations).

    As with schedulefree, call ``opt.train()`` before training steps and ``opt.eval()`` before
    evaluating or saving (the parameters then hold the average x); a step in eval mode is
    refused. Each step is one launch per group; each mode switch one more. The step's averaging
    weight and scheduled learning rate are worked out on the host from the group's counters, as
    schedulefree does, so the step runs eagerly under ``torch.compile`` (a graph break) and
    ``gpuopt.graphed_step`` refuses it.
    """

    _algorithm = schedule_free_kernel.SCHEDULE_FREE
    _host_schedule = True  # gpuopt.graphed_step cannot replay it
    _copied_states = ("z",)  # z starts as a copy of the parameter

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, foreach=None, *, maximize=False, fused=None, capturable=False,
                 differentiable=False, state_dtype=None, master_weights=False, stochastic_rounding=False):
        validate_common(lr, eps, weight_decay)
        _validate_betas(betas)
        if betas[0] == 0.0:
            raise ValueError("Invalid beta parameter at index 0: 0.0 (eval() moves the parameters to the average "
                             "through 1 - 1/beta1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
                        weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
                        weight_decay=weight_decay,
                        **_precision_defaults(state_dtype, master_weights, stochastic_rounding, capturable,
                                              differentiable, foreach, fused, maximize))
        super().__init__(params, defaults)

    @torch.compiler.disable
    def step(self, closure=None, **kwargs):
        """One step (``closure``, ``grad_scale``/``found_inf`` as every gpuopt optimizer): the
        group's schedule advanced as schedulefree advances it, then one launch per group. A step
        that raises leaves the counters as they were."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError("Optimizer was not in train mode when step is called. Please insert .train() and "
                               ".eval() calls on the optimizer. See documentation for details.")
        counters = [{key: group[key] for key in ("scheduled_lr", "lr_max", "weight_sum")} for group in self.param_groups]
        for group in self.param_groups:
            k, warmup_steps = group["k"], group["warmup_steps"]
            group["scheduled_lr"] = lr = group["lr"] * ((k + 1) / warmup_steps if k < warmup_steps else 1.0)
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            group["weight_sum"] = group["weight_sum"] + ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        try:
            loss = super().step(closure, **kwargs)
        except BaseException:
            for group, saved in zip(self.param_groups, counters):
                group.update(saved)
            raise
        for group in self.param_groups:
            group["k"] += 1
        return loss

    step.hooked = True  # (torch.optim.Optimizer wraps a step without it)

    def _options(self, group):
        k, (beta1, beta2) = group["k"], group["betas"]
        weight = ((k + 1) ** group["r"]) * (group["lr_max"] ** group["weight_lr_power"])
        ckp1 = weight / group["weight_sum"] if group["weight_sum"] else 0.0
        lr = group["scheduled_lr"]
        return dict(beta2=beta2, bias_correction2=1.0 - beta2 ** (k + 1), eps=group["eps"],
                    weight_decay=group["weight_decay"], ckp1=ckp1, y_rate=lr * (beta1 * (1.0 - ckp1) - 1.0),
                    z_rate=lr, maximize=group["maximize"])

    @torch.no_grad()
    def train(self):
        """Move every stepped parameter from the average x to y, where gradients are taken."""
        self._switch(train=True)

    @torch.no_grad()
    def eval(self):
        """Move every stepped parameter to the average x, for evaluation and checkpoints."""
        self._switch(train=False)

    def _switch(self, train: bool) -> None:
        """p ← p + w (z - p) over the group's stepped parameters, one launch per bucket."""
        for index, group in enumerate(self.param_groups):
            if group["train_mode"] == train:
                continue
            beta1 = group["betas"][0]
            params = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if params:
                algorithm = schedule_free_kernel.SWITCH
                step_roles = self._roles(group, params, None)  # (the step's tensors, master stand-ins included)
                roles = {role: step_roles.get(role) for role in algorithm.roles}
                name = type(self).__name__
                options = step_options(algorithm, dict(weight=1.0 - beta1 if train else 1.0 - 1.0 / beta1))
                for bucket in prepare_buckets(name, local_roles(roles), algorithm, self._plans, ("switch", index),
                                              group["stochastic_rounding"]):
                    launch_step(algorithm, bucket, options, self._step_args(bucket.plan.device, None, None), 0.0)
                    bucket.plan.release()
            group["train_mode"] = train
