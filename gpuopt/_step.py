"""The plain path of one optimizer step: validate → plan → launch, for a launch's lists of
tensors. ``gpuopt.functional`` and the ``torch.compile`` operator (``_compiled``) call
``run_functional`` on every call; the optimizer classes (``_fused``) share its pieces and keep
what they validated between steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import _launch
from ._distributed import any_dtensor, check_sharded_pairs, local_roles
from ._multi_tensor import PlanCache, ThreadPlans, plan_launches
from ._validate import check_params_and_grads, check_roles, matching_layout, real_views

_FUNCTIONAL_PLANS = ThreadPlans()  # for the functional API, whose callers keep no plans


@dataclass
class StepArgs:
    """Arguments shared by every launch of one ``step()``: AMP's scale and overflow flag (device
    tensors, never read on the host), the stochastic-rounding seed and epoch (an optimizer's
    launch count on the device, advanced by each rounded launch; None for the functional API,
    whose caller varies the seed)."""

    device: torch.device
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    seed: int = 0
    epoch: torch.Tensor | None = None

    @property
    def has_grad_scale(self) -> bool:
        return self.grad_scale is not None

    def lr_on_device(self, lr) -> bool:
        return isinstance(lr, torch.Tensor) and lr.device == self.device

    def lr_args(self, lr) -> tuple:
        """The kernels' ``(lr, lr_ptr)``: a tensor ``lr`` on the parameters' device is read by the
        kernel (``lr_ptr``); a CPU tensor or a float is passed by value (reading a CPU tensor does
        not synchronise), as a float64 argument."""
        if self.lr_on_device(lr):
            return 0.0, lr
        return float(lr), None


def step_launcher(algorithm, options: dict):
    """``launch(plan, step_args, *, lr, has_master, stochastic_rounding)``: one step of
    ``algorithm`` (a ``kernels._multi_tensor.Algorithm``) with ``options`` (its keyword arguments
    but ``lr``, which is read at every launch), worked out into the kernel's arguments once."""
    options = {name: plain_number(value) for name, value in options.items()}
    hyperparameters, flags = algorithm.hyperparameters(**options)
    has_step = algorithm.uses_step(options)

    def launch(plan, step_args, *, lr, has_master, stochastic_rounding):
        _launch.launch_step(algorithm, plan, step_args, lr, hyperparameters, flags, has_master=has_master,
                            stochastic_rounding=stochastic_rounding, has_step=has_step)
    return launch


def plain_number(value):
    """An option as the kernel takes it: a one-element tensor (torch computes with 0-d tensor
    hyperparameters; a device tensor is read once, a host sync) or a NumPy scalar as the Python
    number it holds; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def needed_roles(algorithm, options: dict) -> tuple:
    """The state roles ``options`` make the kernel read and write (``step`` first, when used)."""
    return (("step",) if algorithm.uses_step(options) else ()) + tuple(algorithm.states(options))


def bucket_precision(plan, master_role: int | None, has_masters: bool, stochastic_rounding: bool):
    """(HAS_MASTER, STOCHASTIC_ROUNDING) for one launch group: a master copy only for bf16/fp16
    params (fp32 params in the same call carry themselves as a stand-in), stochastic rounding only
    for bf16 params without one."""
    param_dtype = plan.bases()[0].dtype
    low_precision = param_dtype in (torch.bfloat16, torch.float16)
    has_master = (has_masters and low_precision and master_role is not None
                  and plan.bases()[master_role].dtype == torch.float32)
    return has_master, bool(stochastic_rounding) and not has_master and param_dtype == torch.bfloat16


def prepare_launches(name: str, roles: dict, role_names: tuple, plans: PlanCache, key,
                     stochastic_rounding: bool) -> list:
    """Validate one launch's tensors (``gpuopt._validate.check_roles``) and split it into launch
    groups: ``[(plan, has_master, stochastic_rounding, positions in the lists)]``. The slow path, shared by the functional
    API (every call) and the optimizer classes (only when something changed)."""
    roles = real_views(roles)
    check_roles(name, roles, role_names)
    has_masters = roles.get("master") is not None
    master_role = role_names.index("master") if "master" in role_names else None
    return [(plan, *bucket_precision(plan, master_role, has_masters, stochastic_rounding), index)
            for plan, index in plan_launches(roles, role_names, plans, key)]


def dense_grads(algorithm, grads, weight_decay):
    """Sparse gradients (``nn.Embedding(sparse=True)``) as dense ones, for the algorithms torch
    takes them in (SGD, Adagrad: ``Algorithm.sparse_grads``): there a zero gradient element
    leaves the parameter and state exactly as torch's sparse update leaves an absent one (SGD's
    momentum decays everywhere in both). Other algorithms get them unchanged, for
    ``check_params_and_grads`` to refuse with torch's message."""
    rule = algorithm.sparse_grads
    if rule is None or all(g is None or g.layout is torch.strided for g in grads):
        return grads
    if rule == "without weight decay" and weight_decay != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    return [g if g is None or g.layout is torch.strided else g.to_dense() for g in grads]


def run_functional(name: str, algorithm, roles: dict, options: dict, *, lr, grad_scale, found_inf, seed,
                   stochastic_rounding, epoch=None) -> None:
    """The functional API's path: the caller's lists are new every call, so they are checked every
    call (params and grads, then every role), grads copied to their params' layout if needed,
    then one launch per (device, dtypes) group."""
    if not roles["param"]:
        return
    missing = [role for role in needed_roles(algorithm, options) if roles.get(role) is None]
    if missing:  # the kernel would write them: refused, as torch's functional API refuses them
        raise ValueError(f"{name}: the {' and '.join(missing)} tensors are None, but these options update them; "
                         "pass one tensor per parameter (zeros for a new state)")
    if any_dtensor(roles["param"]):  # DTensors: each rank updates its local shards
        check_sharded_pairs(name, roles["param"], roles["grad"])
        roles = local_roles(roles)
    params = roles["param"]
    roles = dict(roles, grad=dense_grads(algorithm, roles["grad"], options.get("weight_decay", 0.0)))
    check_params_and_grads(name, params, roles["grad"])
    roles = dict(roles, grad=[matching_layout(g, p) for g, p in zip(roles["grad"], params)])
    launches = prepare_launches(name, roles, algorithm.roles, _FUNCTIONAL_PLANS.plans, name, stochastic_rounding)
    device = params[0].device
    step_args = StepArgs(device, on_device(grad_scale, device), on_device(found_inf, device), seed, epoch)
    launch = step_launcher(algorithm, options)
    for plan, has_master, sr, _ in launches:
        launch(plan, step_args, lr=lr, has_master=has_master, stochastic_rounding=sr)
        plan.release()  # the cache of plans keeps none of the caller's tensors alive


def on_device(t, device):
    """AMP tensors arrive on the scaler's device; the kernel needs them on the parameters'."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    return t.to(device=device, dtype=torch.float32)
