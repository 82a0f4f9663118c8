"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): the kernels update each rank's
local shard.

An optimizer step is elementwise, so a sharded (``Shard``) or replicated (``Replicate``) parameter
is updated by updating, on every rank, its local tensor with the local tensor of its gradient and
of each state — no communication. The states are made from the parameter with torch ops
(``torch.full_like(p, ...)``), so they are DTensors with the parameter's mesh and placements, and
``state_dict()`` is sharded exactly as torch's optimizers' is (``torch.distributed.checkpoint``
saves and loads it). What cannot be updated locally is refused: a gradient whose placement is
``Partial`` (a sum not reduced yet) or differs from its parameter's, a DTensor paired with a plain
tensor, and (on a GPU machine) DTensors that FSDP2's CPU offload keeps on the CPU.
"""

from __future__ import annotations

import torch

from ._launch import interpreter_enabled

try:  # torch.distributed may be left out of a build
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - every build CI and the GPU machine use has it
    DTensor = Replicate = distribute_tensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local(t):
    """A DTensor's local tensor (what this rank's kernel reads and writes, sharing its storage);
    any other value itself. (``_local_tensor`` rather than ``to_local()``: the latter is an
    autograd function, costly per call, and the step runs under no_grad anyway.)"""
    return t._local_tensor if is_dtensor(t) else t


def local_roles(roles: dict) -> dict:
    """Every tensor of a launch's role lists as its local tensor."""
    return {name: None if tensors is None else [local(t) for t in tensors] for name, tensors in roles.items()}


def check_sharded_pairs(name: str, params, grads) -> None:
    """Parameters and gradients that can be updated shard by shard: a DTensor parameter has a
    DTensor gradient (or none) on the same mesh with the same placements, none of them Partial;
    a plain parameter has a plain gradient."""
    for index, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if is_dtensor(p) != is_dtensor(g):
            kinds = ("a DTensor", "a plain tensor") if is_dtensor(p) else ("a plain tensor", "a DTensor")
            raise RuntimeError(f"{name}: parameter {index} is {kinds[0]} but its gradient is {kinds[1]}; "
                               "both must be DTensors (FSDP2, tensor parallel) or both plain tensors")
        if not is_dtensor(p):
            continue
        if p.device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError(f"{name}: parameter {index} is a DTensor on the CPU: FSDP2's CPUOffloadPolicy keeps the "
                               "sharded parameters, gradients and optimizer states there, where gpuopt's kernels "
                               "cannot run. Step offloaded parameters with torch.optim (its CPU step), or drop the "
                               "offload policy to keep them on the GPU")
        if any(placement.is_partial() for placement in g.placements):
            raise RuntimeError(f"{name}: the gradient of parameter {index} has placements {g.placements}: a "
                               "Partial gradient is a sum not reduced yet; reduce it (g.redistribute(...) or let "
                               "FSDP/DDP reduce it) before the step")
        if g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements):
            raise RuntimeError(f"{name}: the gradient of parameter {index} is placed {tuple(g.placements)} on "
                               f"{g.device_mesh}, the parameter {tuple(p.placements)} on {p.device_mesh}; "
                               "an elementwise step needs them placed alike")


def shard_groups(name: str, params) -> tuple:
    """The process groups over which a whole-tensor sum of these parameters' local shards (LAMB's
    and LARS's norms) is completed by an all-reduce: one per mesh dimension they are sharded along
    (``Shard``; none for plain tensors, or replicated ones, whose local tensor is whole). Summing
    over every sharded dimension in turn gives the total; the parameters of one launch must agree
    on mesh and sharded dimensions, or be plain tensors all."""
    if not any_dtensor(params):
        return ()
    layouts = {(p.device_mesh, tuple(dim for dim, placement in enumerate(p.placements) if placement.is_shard()))
               if is_dtensor(p) else None for p in params}
    if len(layouts) != 1 or None in layouts:
        raise RuntimeError(f"{name}: its update needs whole-tensor norms, summed over the ranks that hold a "
                           "parameter's shards; the parameters of a group must then be DTensors on one mesh, sharded "
                           "along the same mesh dimensions (FSDP2 shards them so), not a mix")
    mesh, dims = layouts.pop()
    return tuple(mesh.get_group(dim) for dim in dims)


def like_dtensor(value: torch.Tensor, param) -> torch.Tensor:
    """A checkpoint's state for a DTensor parameter: a plain (full) tensor is distributed like the
    parameter; a DTensor is left as is (``torch.distributed.checkpoint`` gives it sharded)."""
    if is_dtensor(param) and not is_dtensor(value):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def replicated(t: torch.Tensor, mesh):
    """``t`` (the same on every rank) as a DTensor replicated over ``mesh``."""
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
