"""Machinery shared by the fused optimizers: grouping tensors into launches, per-step arguments,
validation, and the ``torch.optim.Optimizer`` base class."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from ._multi_tensor import PlanCache
from ._runtime import check_kernel_device

_FUNCTIONAL_PLANS = PlanCache()  # for the functional API, whose callers keep no plans


@dataclass
class StepArgs:
    """Arguments shared by every launch of one ``step()``: AMP's scale and overflow flag (device
    tensors, never read on the host) and the stochastic-rounding seed."""

    device: torch.device
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    seed: int = 0

    @property
    def has_grad_scale(self) -> bool:
        return self.grad_scale is not None

    @property
    def has_found_inf(self) -> bool:
        return self.found_inf is not None

    @property
    def grad_scale_ptr(self):
        return self.grad_scale

    @property
    def found_inf_ptr(self):
        return self.found_inf

    def lr_on_device(self, lr) -> bool:
        return isinstance(lr, torch.Tensor) and lr.device == self.device

    def lr(self, lr):
        """A tensor ``lr`` on the parameters' device is read by the kernel; a CPU tensor or a
        float is passed by value (reading a CPU tensor does not synchronise)."""
        if self.lr_on_device(lr):
            return lr
        return float(lr)


def log_of(beta: float) -> float:
    """log(β) in float64 for the kernels' bias corrections; log(0) = -inf (then 1 - 0^t = 1)."""
    return math.log(beta) if beta > 0 else float("-inf")


_FLOAT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))


def check_tensors(name: str, params, grads) -> None:
    """Clear errors, before any kernel runs, for input the kernels must not see.

    This runs every step over every parameter, so the common case is one cheap test per pair
    and the specific message is worked out only when it fails."""
    for p, g in zip(params, grads):
        if (g.layout is not torch.strided or p.dtype not in _FLOAT_DTYPES or g.dtype not in _FLOAT_DTYPES
                or g.shape != p.shape or g.device != p.device):
            _explain_bad_pair(name, p, g)
    for p in {p.device: p for p in params}.values():  # one parameter per device
        check_kernel_device(p, f"{name}'s parameter")


def _explain_bad_pair(name, p, g):
    if g.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam "
                           "or densify the gradient (grad.to_dense())")
    if p.is_complex() or g.is_complex():
        raise RuntimeError(f"{name} does not support complex parameters or gradients; optimize "
                           "torch.view_as_real(param) instead")
    if not p.is_floating_point():
        raise RuntimeError(f"{name} updates floating-point parameters; got a {p.dtype} parameter")
    if not g.is_floating_point():
        raise RuntimeError(f"{name}: gradient has dtype {g.dtype}, expected a floating-point gradient")
    if g.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(g.shape)} does not match parameter "
                           f"shape {tuple(p.shape)}")
    if g.device != p.device:
        raise RuntimeError(f"{name}: gradient on {g.device} but parameter on {p.device}; "
                           "parameters, gradients and states must share a device")
    raise RuntimeError(f"{name}: unsupported gradient layout {g.layout}")


def matching_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The gradient in the parameter's memory layout (the kernel pairs elements by storage
    position). Autograd nearly always produces this already; otherwise one copy is made."""
    if grad.stride() == param.stride() or param.numel() <= 1:
        return grad
    return torch.empty_like(param, dtype=grad.dtype).copy_(grad)


def bucket_precision(plan, master_role: int, has_masters: bool, stochastic_rounding: bool):
    """(HAS_MASTER, STOCHASTIC_ROUNDING) for one launch group: a master copy only for bf16/fp16
    params (fp32 params in the same call carry themselves as a stand-in), stochastic rounding only
    for bf16 params without one."""
    param_dtype = plan.bases()[0].dtype
    low_precision = param_dtype in (torch.bfloat16, torch.float16)
    has_master = has_masters and low_precision and plan.bases()[master_role].dtype == torch.float32
    return has_master, bool(stochastic_rounding) and not has_master and param_dtype == torch.bfloat16


def launch_grouped(roles: dict, role_names: tuple, launch, *, plans: PlanCache | None = None,
                   key=None, trusted: bool = False) -> None:
    """Group tensor ``i`` of every role by (device, dtype of each role) and call ``launch(plan)``
    once per group. A role missing from ``roles`` is filled with the param tensors as a
    placeholder that the kernel's flags keep it from touching. ``trusted``: the states were made
    by a gpuopt optimizer (on the parameter's device, step as float32), so only the caller's
    tensors need checking — this runs every step, and skipping a per-tensor loop per role matters
    on models with hundreds of parameters."""
    plans = _FUNCTIONAL_PLANS if plans is None else plans
    params = roles["param"]
    if not trusted:
        _check_roles(roles, params)
    present = [name for name in role_names if roles.get(name) is not None]
    keys = list(zip([p.device for p in params], *[[t.dtype for t in roles[name]] for name in present]))
    if keys.count(keys[0]) == len(keys):  # the common case: one group
        buckets = {keys[0]: None}
    else:
        buckets = defaultdict(list)
        for i, k in enumerate(keys):
            buckets[k].append(i)
    for bucket_key, index in buckets.items():
        ordered = []
        for name in role_names:
            tensors = roles.get(name)
            if tensors is None:
                tensors = params
            ordered.append(tensors if index is None else [tensors[i] for i in index])
        launch(plans.get((key, bucket_key), ordered))


def _check_roles(roles, params):
    for name, tensors in roles.items():
        if tensors is not None and len(tensors) != len(params):
            raise ValueError(f"got {len(tensors)} {name} tensors for {len(params)} parameters")
        if tensors is not None and name != "step":
            for p, t in zip(params, tensors):
                if t.device != p.device:
                    raise RuntimeError(f"{name} tensor on {t.device} but its parameter on {p.device}")
    for step in roles.get("step") or ():
        if step.dtype != torch.float32 or step.numel() != 1:
            raise RuntimeError("state steps must be one-element float32 tensors")
    for p, step in zip(params, roles.get("step") or ()):
        if step.device != p.device:
            raise RuntimeError(f"state step on {step.device} but parameter on {p.device}: gpuopt keeps "
                               "`step` on the parameter's device (as torch's fused/capturable optimizers do)")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of gpuopt's optimizers: ``torch.optim.Optimizer`` with one kernel launch per group of
    parameters sharing (param group, device, param/grad/state dtypes).

    Subclasses define ``_init_state(state, p, group)`` (lazily, at a parameter's first step) and
    ``_launch(group, params, grads, amp)``, which calls the matching ``gpuopt.functional`` op with
    the group's hyperparameters and ``**amp`` (AMP tensors, seed, plan cache).

    Extra options, on every subclass:
        state_dtype: dtype of the optimizer states; ``None`` (default) uses each parameter's dtype
            as PyTorch does; ``torch.float32`` keeps fp32 states for bf16/fp16 parameters.
        master_weights: keep an fp32 copy of every low-precision parameter (``state["master_param"]``);
            the kernel updates the copy and writes the rounded value to the parameter in one pass.
        stochastic_rounding: round bf16 parameters stochastically (unbiased) when there is no
            master copy.
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf; no host sync

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._plans = PlanCache()
        self._seed = random.SystemRandom().randrange(2**30)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._plans = PlanCache()
        self._seed = getattr(self, "_seed", 0)

    # -- state ------------------------------------------------------------------------------

    def _state_dtype(self, p, group):
        return group["state_dtype"] or p.dtype

    def _zeros(self, p, group, fill=0.0):
        return torch.full_like(p, fill, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _init_common_state(self, state, p, group):
        if self._has_step:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if self._uses_master(p, group):
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)

    _has_step = True  # PyTorch's state for this algorithm has a `step` (SGD's has none)

    @staticmethod
    def _uses_master(p, group) -> bool:
        return bool(group["master_weights"]) and p.dtype in (torch.bfloat16, torch.float16)

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, then with gpuopt's placement: ``step`` as
        a float32 tensor on the parameter's device, states in the group's ``state_dtype``, the
        master copy in fp32, each cast from the checkpoint's own values (never through the
        parameter's lower precision) and copied, never aliased with the checkpoint's tensors."""
        originals = {pid: dict(s) for pid, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(ids, params):
            if pid not in originals:
                continue
            state, group = self.state[p], group_of[id(p)]
            for key, value in originals[pid].items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True).reshape(())
                elif key == "master_param":
                    state[key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                elif value.is_floating_point():
                    state[key] = value.detach().to(device=p.device, dtype=self._state_dtype(p, group), copy=True)
            if self._uses_master(p, group) and "master_param" not in state:
                state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        self._plans.clear()

    # -- step -------------------------------------------------------------------------------

    # Inside torch.compile a step runs eagerly (a graph break): it is one launch already, and
    # Dynamo cannot trace the launch plans (they read storage addresses).
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One optimizer step; one kernel launch per (param group, device, dtypes).

        ``grad_scale`` / ``found_inf`` (device tensors) are AMP's: gradients are divided by
        ``grad_scale`` inside the kernel and the whole step is skipped on the device when
        ``found_inf`` is nonzero. ``torch.amp.GradScaler`` sets them as attributes, as it does for
        PyTorch's fused optimizers; both ways work.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None) if grad_scale is None else grad_scale
        found_inf = getattr(self, "found_inf", None) if found_inf is None else found_inf
        for index, group in enumerate(self.param_groups):
            params, grads = [], []
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_common_state(state, p, group)
                    self._init_state(state, p, group)
            amp = dict(grad_scale=_on(grad_scale, params[0]), found_inf=_on(found_inf, params[0]),
                       seed=self._seed, _plans=self._plans, _key=index)
            self._launch(group, params, grads, amp)
        return loss

    def _masters(self, params, group):
        if not any(self._uses_master(p, group) for p in params):
            return None
        # Parameters without a master copy (fp32 ones) get their own value as a stand-in; they
        # land in a different launch group (dtype differs), where the master flag is off.
        return [self.state[p].get("master_param", p) for p in params]


def _on(t, like):
    """AMP tensors arrive on the scaler's device; the kernel needs them on the parameters'."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    return t.to(device=like.device, dtype=torch.float32)


def validate_common(lr, eps=None, weight_decay=0.0):
    """PyTorch's checks and messages for the hyperparameters every optimizer shares."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def validate_precision(state_dtype, differentiable):
    if state_dtype not in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"Invalid state_dtype: {state_dtype} (None, or a floating-point dtype)")
    if differentiable:
        raise NotImplementedError("gpuopt optimizers are not differentiable (differentiable=True); "
                                  "use torch.optim for higher-order optimization")
