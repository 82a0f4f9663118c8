"""The optimizer step inside ``torch.compile``: one custom operator per optimizer class, called
once per param group, no graph break.

Dynamo traces ``FusedOptimizer.step`` down to ``torch.ops.gpuopt.<Class>_step`` (``AdamW_step``,
...): one list argument per role of the algorithm, named after it (``Algorithm.roles``: ``param``,
``grad``, ``step``, ``exp_avg``, ...; an empty list for a role the options leave out), the
algorithm's options as numbers, ``lr`` and AMP's tensors, and the stochastic-rounding seed and
epoch. Its schema is written from those names: every role but ``grad`` is mutated, and the epoch,
so AOTAutograd and Inductor order the operator with the rest of the graph. Its implementation is
the functional API's path (``_multi_tensor.run_functional``: every tensor validated on every
call, since the graph may hand it copies of the optimizer's tensors — functionalization may clone
a mutated input and copy it back). The eager step keeps its fast path and never goes through the
dispatcher.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ._distributed import any_dtensor
from ._multi_tensor import needed_roles, run_functional

_OPERATORS: dict = {}  # operator name → (optimizer name, Algorithm)


def register(name: str, algorithm) -> str:
    """Define the operator of the optimizer class ``name`` (every ``FusedOptimizer`` subclass
    that names an algorithm) and return its name under ``torch.ops.gpuopt``."""
    op_name = f"{name}_step"
    while op_name in _OPERATORS:  # another class of the same name (a test's, a reloaded module's)
        op_name += "_"
    _OPERATORS[op_name] = (name, algorithm)
    roles = ", ".join(f"Tensor[] {role}" if role == "grad" else f"Tensor(a{i}!)[] {role}"
                      for i, role in enumerate(algorithm.roles))
    schema = (f"({roles}, Scalar[] options, float lr, Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, "
              f"int seed, Tensor(e!)? epoch, bool stochastic_rounding) -> ()")
    mutated = tuple(role for role in algorithm.roles if role != "grad") + ("epoch",)
    operator = torch.library.custom_op(f"gpuopt::{op_name}", functools.partial(_step, op_name),
                                       mutates_args=mutated, schema=schema)
    operator.register_fake(_no_output)
    return op_name


def option_names(algorithm) -> tuple:
    """The algorithm's options in the order the operator passes them: its ``hyperparameters``'
    keyword arguments, sorted (on the optimizer class as ``_traced_options``)."""
    return tuple(sorted(inspect.signature(algorithm.hyperparameters).parameters))


def _step(op_name, *args) -> None:
    """One step of the operator's algorithm over one param group's lists (the schema's order)."""
    name, algorithm = _OPERATORS[op_name]
    n = len(algorithm.roles)
    lists, (options, lr, lr_tensor, grad_scale, found_inf, seed, epoch, stochastic_rounding) = args[:n], args[n:]
    roles = {role: list(tensors) if tensors else None for role, tensors in zip(algorithm.roles, lists)}
    _run_functional_eagerly(name, algorithm, roles, dict(zip(option_names(algorithm), options)),
                            lr=lr if lr_tensor is None else lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                            seed=seed, epoch=epoch, stochastic_rounding=stochastic_rounding)


def _no_output(*args) -> None:
    return None


# The operator's body is never traced: a graph break elsewhere in a step could otherwise let Dynamo
# follow the launch into Triton.
_run_functional_eagerly = torch.compiler.disable(run_functional)


def traced_step(opt, closure=None, *, grad_scale=None, found_inf=None):
    """``opt.step()`` as Dynamo traces it: per param group, the lists of its tensors and one call
    of the operator. Falls back to the eager step (a graph break) for what the operator cannot
    take: a state not made yet (the first step), an option given as a tensor, fp32 parameters
    standing in for their own master copy, DTensor parameters, step hooks."""
    if not all(_traceable(opt, group) for group in opt.param_groups):
        return opt._hooked_step(closure, grad_scale=grad_scale, found_inf=found_inf)
    loss, grad_scale, found_inf = opt._begin_step(closure, grad_scale, found_inf)
    algorithm = opt._algorithm
    operator = getattr(torch.ops.gpuopt, opt._traced_op)
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
        options = opt._options(group)
        lr = group["lr"]
        on_device = isinstance(lr, torch.Tensor)
        rounded = bool(group["stochastic_rounding"])
        operator(*[lists.get(role, []) for role in algorithm.roles], [options[name] for name in opt._traced_options],
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
