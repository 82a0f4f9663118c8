"""The optimizer step inside ``torch.compile``: one custom operator per param group, no graph break.

Dynamo traces ``FusedOptimizer.step`` down to ``torch.ops.gpuopt.multi_tensor_step``: the group's
tensors as lists (one per role of the algorithm, in its order), the algorithm's options as
numbers, ``lr`` and AMP's tensors. The operator declares which lists it mutates, so AOTAutograd and
Inductor order it with the rest of the graph; its implementation is the functional API's path
(``run_functional``: every tensor validated on every call, since the graph may hand it copies of
the optimizer's tensors — functionalization may clone a mutated input and copy it back). The
eager step keeps its fast path and never goes through the dispatcher.
"""

from __future__ import annotations

import inspect

import torch

from ._distributed import any_dtensor
from ._multi_tensor import needed_roles, run_functional
from .kernels._multi_tensor import MAX_ROLES  # the operator has one list argument per role slot

_ALGORITHMS: dict = {}  # key → (the optimizer's name, its Algorithm)
# The operator's body is never traced: a graph break elsewhere in a step could otherwise let Dynamo
# follow the launch into Triton.
_run_functional_eagerly = torch.compiler.disable(run_functional)


def register(key: str, name: str, algorithm) -> None:
    """Make ``algorithm`` callable through the operator as ``key`` (done for every
    ``FusedOptimizer`` subclass that names an algorithm)."""
    _ALGORITHMS[key] = (name, algorithm)


def option_names(algorithm) -> tuple:
    """The algorithm's options in the order the operator passes them: its ``hyperparameters``'
    keyword arguments, sorted (kept on the optimizer class as ``_compiled_options``)."""
    return tuple(sorted(inspect.signature(algorithm.hyperparameters).parameters))


@torch.library.custom_op("gpuopt::multi_tensor_step",
                         mutates_args=("role_0", "role_2", "role_3", "role_4", "role_5", "role_6", "epoch"))
def multi_tensor_step(role_0: list[torch.Tensor], role_1: list[torch.Tensor], role_2: list[torch.Tensor],
                      role_3: list[torch.Tensor], role_4: list[torch.Tensor], role_5: list[torch.Tensor],
                      role_6: list[torch.Tensor], algorithm: str, options: list[int | float | bool], lr: float,
                      lr_tensor: torch.Tensor | None, grad_scale: torch.Tensor | None,
                      found_inf: torch.Tensor | None, seed: int, epoch: torch.Tensor | None,
                      stochastic_rounding: bool) -> None:
    """One step of the registered ``algorithm`` over the tensors of one param group: ``role_k``
    holds the tensors of the algorithm's role ``k`` (``role_1``, the gradients, is read only), an
    empty list for a role the options leave out; ``epoch``, the optimizer's stochastic-rounding
    epoch on the parameters' device (advanced)."""
    name, spec = _ALGORITHMS[algorithm]
    slots = (role_0, role_1, role_2, role_3, role_4, role_5, role_6)
    roles = {role: list(slots[k]) if slots[k] else None for k, role in enumerate(spec.roles)}
    _run_functional_eagerly(name, spec, roles, dict(zip(option_names(spec), options)),
                            lr=lr if lr_tensor is None else lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                            seed=seed, epoch=epoch, stochastic_rounding=stochastic_rounding)


@multi_tensor_step.register_fake
def _multi_tensor_step_fake(role_0, role_1, role_2, role_3, role_4, role_5, role_6, algorithm, options, lr,
                            lr_tensor, grad_scale, found_inf, seed, epoch, stochastic_rounding):
    return None


def traced_step(opt, closure=None, *, grad_scale=None, found_inf=None):
    """``opt.step()`` as Dynamo traces it: per param group, the lists of its tensors and one call
    of the operator. Falls back to the eager step (a graph break) for what the operator cannot
    take: a state not made yet (the first step), an option given as a tensor, fp32 parameters
    standing in for their own master copy, DTensor parameters, step hooks."""
    if not all(_traceable(opt, group) for group in opt.param_groups):
        return opt._hooked_step(closure, grad_scale=grad_scale, found_inf=found_inf)
    loss, grad_scale, found_inf = opt._begin_step(closure, grad_scale, found_inf)
    spec = opt._algorithm
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [opt.state.get(p, {}) for p in params]
        lists = {"param": params, "grad": [p.grad for p in params]}
        if opt._uses_step(group):
            lists["step"] = [s["step"] for s in states]
        for role in opt._state_roles(group):
            lists[role] = [s[role] for s in states]
        if group["master_weights"]:
            lists["master"] = [s["master_param"] for s in states]
        slots = [lists.get(role, []) for role in spec.roles] + [[]] * (MAX_ROLES - len(spec.roles))
        options = opt._options(group)
        lr = group["lr"]
        on_device = isinstance(lr, torch.Tensor)
        rounded = bool(group["stochastic_rounding"])
        torch.ops.gpuopt.multi_tensor_step(
            *slots, opt._compiled_key, [options[name] for name in opt._compiled_options],
            0.0 if on_device else float(lr), lr if on_device else None, grad_scale, found_inf, opt._seed or 0,
            opt._epoch(params[0].device) if rounded else None, rounded)
    opt._clip.value = None
    return loss


def _traceable(opt, group) -> bool:
    options = opt._options(group)
    if any(isinstance(value, torch.Tensor) for value in options.values()) or any_dtensor(group["params"]):
        return False  # (a DTensor's step runs eagerly: the operator takes plain tensors)
    if group["stochastic_rounding"] and (opt._seed is None or any(p.device not in opt._epochs for p in group["params"])):
        return False  # (the eager step draws the seed and makes the epoch)
    needed = needed_roles(opt._algorithm, options)
    for p in group["params"]:
        if p.grad is None:
            continue
        state = opt.state.get(p, {})
        if any(role not in state for role in needed):
            return False
        if group["master_weights"] and "master_param" not in state:
            return False
    return True
