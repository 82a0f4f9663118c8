"""``gpuopt.clip_grad_norm_`` / ``gpuopt.get_total_norm``: ``torch.nn.utils``' gradient clipping
with the norm taken by one multi-tensor launch per (device, dtype) (``gpuopt/kernels/grad_norm.py``),
for plain and DTensor (FSDP2, tensor parallel) gradients, without synchronising with the host."""

from __future__ import annotations

import math
import types
import warnings

import torch

from . import _launch
from ._distributed import is_dtensor, local, replicated
from ._multi_tensor import ThreadPlans, plan_launches
from ._launch import check_kernel_device
from ._validate import is_dense
from .kernels import grad_norm as kernels

_PLANS = ThreadPlans()


def _as_list(tensors) -> list:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach=None) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` together, as ``torch.nn.utils.get_total_norm``:
    a 0-dim tensor on the first tensor's device, in their (promoted) dtype. DTensors contribute
    their local shards, summed (or maxed) over the mesh dimensions they are sharded on by one
    all-reduce per placement, so every rank gets the same full norm (returned, as torch returns it,
    as a DTensor replicated over the gradients' mesh). ``foreach`` is accepted for
    torch's signature; the norm is always one launch per (device, dtype).

    ``norm_type``: any p > 0 or ``inf``; other norms (p ≤ 0, ``-inf``) and complex tensors are
    left to torch (``torch.nn.utils.get_total_norm``)."""
    tensors = [t for t in _as_list(tensors) if t is not None]
    norm_type = float(norm_type)
    if not tensors:
        return torch.tensor(0.0)
    if not (norm_type > 0) or any(t.is_complex() for t in tensors):
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    maximum = math.isinf(norm_type)
    kind = kernels.MAXIMUM if maximum else (kernels.SQUARES if norm_type == 2.0 else
                                            kernels.ABSOLUTES if norm_type == 1.0 else kernels.POWERS)
    device, dtype = tensors[0].device, tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    # One partial total per placement (the mesh and the dimensions it is sharded on), then one
    # all-reduce for each sharded placement: Σ (or max) over the ranks holding other shards.
    by_placement: dict = {}
    for t in tensors:
        key = (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None
        by_placement.setdefault(key, []).append(local(t))
    total = None
    for key, locals_ in by_placement.items():
        part = _local_total(locals_, norm_type, kind).to(device)
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_shard():
                    torch.distributed.all_reduce(part, op=torch.distributed.ReduceOp.MAX if maximum
                                                 else torch.distributed.ReduceOp.SUM, group=mesh.get_group(dim))
        total = part if total is None else (torch.maximum(total, part) if maximum else total + part)
    norm = total if maximum or kind == kernels.ABSOLUTES else total.pow(1.0 / norm_type)
    norm = norm.to(dtype)
    if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):  # a host sync, as in torch
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so "
                           "it cannot be clipped. To disable this error and scale the gradients by the non-finite "
                           "norm anyway, set `error_if_nonfinite=False`")
    meshes = [key[0] for key in by_placement if key is not None]
    if meshes:  # as torch's norm of DTensors: a DTensor replicated over the (first) mesh
        return replicated(norm, meshes[0])
    return norm


def _local_total(tensors, norm_type: float, kind) -> torch.Tensor:
    """Σ|t|^p (or max|t|) over plain tensors, in fp64 where any is fp64 else fp32: one kernel launch
    per (device, dtype), its per-program partials folded by one torch reduction."""
    for t in {t.device: t for t in tensors}.values():
        check_kernel_device(t, "clip_grad_norm_'s gradient")
    # The kernel reads each tensor as a flat run of elements from a whole-element address; any
    # other tensor (a strided slice, an odd offset) is read from a copy. Empty tensors add nothing.
    tensors = [t if is_dense(t) and t.data_ptr() % t.element_size() == 0 else t.contiguous()
               for t in tensors if t.numel()]
    accumulate = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    partials = []
    for plan, _ in plan_launches({"grad": tensors}, ("grad",), _PLANS.plans, "norm"):
        out = torch.zeros(plan.grid[0], dtype=torch.float64 if plan.float64 else torch.float32, device=plan.device)
        _launch.launch(kernels.norm_partials_kernel, plan.grid, (*plan.schedule, plan.bases[0], out, norm_type),
                       dict(KIND=kind, ALIGNED=plan.aligned, BLOCK=plan.block), plan.num_warps, persistent=True)
        plan.release()  # the plan cache keeps none of the caller's tensors alive
        partials.append(out.to(tensors[0].device, accumulate))
    if not partials:
        return torch.zeros((), dtype=accumulate, device=tensors[0].device if tensors else None)
    partials = torch.cat(partials)
    return partials.max() if kind == kernels.MAXIMUM else partials.sum()


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``: scale the gradients of ``parameters`` in place so that
    their total ``norm_type``-norm is at most ``max_norm``; returns the total norm before clipping
    (a 0-dim tensor on the gradients' device, never read back to the host unless
    ``error_if_nonfinite``). The coefficient ``min(1, max_norm / (norm + 1e-6))`` stays on the
    device and multiplies every gradient (``torch._foreach_mul_`` on the local tensors, as torch).
    A non-finite norm makes every gradient non-finite (torch's behaviour); AMP's GradScaler then
    skips the step. DTensor gradients (FSDP2): see ``get_total_norm``."""
    is_generator = isinstance(parameters, types.GeneratorType)
    parameters = _as_list(parameters)
    if is_generator and not parameters:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if not grads:
        return norm
    coefficient = torch.clamp(max_norm / (local(norm) + 1e-6), max=1.0)  # torch's, in the norm's dtype
    by_device: dict = {}
    for g in grads:
        by_device.setdefault(local(g).device, []).append(local(g))
    with torch.no_grad():
        for device, group in by_device.items():
            torch._foreach_mul_(group, coefficient.to(device))
    return norm
