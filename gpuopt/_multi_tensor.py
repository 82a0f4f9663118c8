"""The plain path of a multi-tensor step, host side: validate → plan → launch.

``gpuopt/kernels/_multi_tensor.py`` is the device side (the walk every optimizer shares). Here: a
``LaunchPlan`` holds one launch's block schedule and pointer-offset table (the schedule depends
only on the tensors' sizes; the table is rebuilt, one small host-to-device copy, only when some
tensor's storage moved, e.g. when ``zero_grad(set_to_none=True)`` let the next backward allocate
new gradients); ``prepare_buckets`` validates a call's tensors and splits them into buckets (one
launch each); ``run_functional`` is the whole path for ``gpuopt.functional`` and the
``torch.compile`` operator (``_traced``), every call. The optimizer classes (``_fused``) use the
same pieces and keep what they validated between steps.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import numpy as np
import torch

from . import _launch
from ._distributed import any_dtensor, check_sharded_pairs, local_roles, shard_groups
from ._launch import ASSUMED_SM_COUNT, ASSUMED_THREADS_PER_SM, use_gpu_config
from ._validate import check_params_and_grads, check_roles, matching_layout, real_views

# Block size and warps: 8 fp32 elements per thread (two 16-byte accesses per stream) on a GPU.
# The interpreter runs blocks one after another in NumPy, at a cost per block rather than per
# element: small test tensors get a small block (so they span several blocks, and tail and
# full-block paths are both exercised), a real model's tensors a block of up to 16384.
GPU_BLOCK, GPU_WARPS = 2048, 8
INTERPRETER_BLOCK, INTERPRETER_MAX_BLOCK, INTERPRETER_PROGRAMS = 128, 16384, 3


def interpreter_block(numels) -> int:
    """Block size for an interpreter launch: 128 up to a few hundred elements, then ~1/4 of the
    largest tensor (a power of 2)."""
    largest = max(numels, default=0)
    return min(INTERPRETER_MAX_BLOCK, max(INTERPRETER_BLOCK, 1 << max(0, (largest // 4 - 1).bit_length())))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def persistent_programs(device: torch.device, num_warps: int) -> int:
    """The programs of a persistent launch at most: every SM's thread slots full (the launch lowers
    this to one wave of the compiled kernel, whose registers allow fewer: ``_launch.launch``)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count * (props.max_threads_per_multi_processor // (32 * num_warps))
    if use_gpu_config(device):
        return ASSUMED_SM_COUNT * (ASSUMED_THREADS_PER_SM // (32 * num_warps))
    return INTERPRETER_PROGRAMS


class LaunchPlan:
    """Schedule and tables for one kernel launch over ``n`` tensors playing several roles.

    ``roles`` is a list (one entry per role, in the kernel's role order) of equally long tensor
    lists; tensor ``t`` of every role has the same number of elements and layout (one-element
    bookkeeping roles such as ``step`` aside). Within a role all tensors share one dtype. Any dense
    layout works: kernels index each tensor's storage as a flat array from its ``data_ptr()``.
    """

    def __init__(self, roles: list[list[torch.Tensor]], block: int | None = None):
        first = roles[0]  # validated by gpuopt._validate.check_roles before any plan is made
        self.device = first[0].device
        self.n_tensors = len(first)
        self.float64 = first[0].dtype == torch.float64  # launch the kernel's float64 variant
        self.numels = tuple(t.numel() for t in first)
        gpu_config = use_gpu_config(self.device)
        # float64 blocks hold half the elements (4 per thread), as batch norm's fp64 tiles are halved
        # too: at 8 per thread the fp64 updates halved their resident programs (bench/NOTES.md).
        gpu_block = GPU_BLOCK // 2 if self.float64 else GPU_BLOCK
        self.block = block or (gpu_block if gpu_config else interpreter_block(self.numels))
        self.num_warps = GPU_WARPS if gpu_config else 4
        counts = [max(1, _cdiv(n, self.block)) for n in self.numels]  # a 0-element tensor still
        # gets one (fully masked) block, so per-tensor bookkeeping such as `step` sees it.
        index = torch.arange(self.n_tensors, dtype=torch.int32)
        block_tensor = torch.repeat_interleave(index, torch.tensor(counts))
        first_block = torch.cumsum(torch.tensor([0] + counts[:-1]), 0)
        block_start = (torch.arange(sum(counts)) - first_block.repeat_interleave(torch.tensor(counts))) * self.block
        self.n_blocks = int(block_tensor.numel())
        self.block_tensor = block_tensor.to(self.device)
        self.block_start = block_start.to(torch.int64).to(self.device)
        self.numel = torch.tensor(self.numels, dtype=torch.int64, device=self.device)
        self.grid = (min(self.n_blocks, persistent_programs(self.device, self.num_warps)),)
        # Arrival counters: the last program of a launch finishes the step (finish_launch), then
        # one per tensor: its last block folds its sums (fold_sums).
        self.counter = torch.zeros(1 + self.n_tensors, dtype=torch.int32, device=self.device)
        self._sums = None
        self._addresses = None
        self.refresh(roles)

    def _schedule(self) -> tuple:
        """The kernel arguments every multi-tensor kernel begins with, in the order they declare them."""
        return self.block_tensor, self.block_start, self.numel, self.offsets, self.n_blocks, self.n_tensors

    def sum_buffers(self, n_sums: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums, partials)`` for an algorithm with ``n_sums`` whole-tensor sums: ``n_sums`` per
        tensor and per schedule entry, in the compute dtype; made at the first such launch and
        kept (the norms launch writes them, the update launch of the same step reads them)."""
        if self._sums is None or self._sums[0].numel() != n_sums * self.n_tensors:
            dtype = torch.float64 if self.float64 else torch.float32
            self._sums = (torch.zeros(n_sums * self.n_tensors, dtype=dtype, device=self.device),
                          torch.zeros(n_sums * self.n_blocks, dtype=dtype, device=self.device))
        return self._sums

    def matches(self, roles: list[list[torch.Tensor]]) -> bool:
        """Same tensor sizes (the schedule still fits); addresses may have changed."""
        return tuple(map(torch.Tensor.numel, roles[0])) == self.numels

    def refresh(self, roles: list[list[torch.Tensor]]) -> None:
        """Point the plan at ``roles``' current storage; copies a new table only if it moved."""
        # map over a C method, not a generator expression: this runs every step for every tensor
        addresses = tuple(itertools.chain.from_iterable(map(torch.Tensor.data_ptr, role) for role in roles))
        self.bases = [role[0] for role in roles]  # each role's base pointer (its first tensor)
        if addresses == self._addresses:
            return
        self._element_sizes = [role[0].element_size() for role in roles]
        # elements of different sizes side by side (one-element roles such as `step` aside): see RUN
        self.mixed_widths = len({role[0].element_size() for role in roles
                                 if role[0].numel() == roles[0][0].numel()}) > 1
        rows = []
        for role, size in zip(roles, self._element_sizes):
            base = role[0].data_ptr()
            rows.append([(t.data_ptr() - base) // size for t in role])
        table = torch.tensor(rows, dtype=torch.int64)
        if self.device.type == "cuda":
            table = table.pin_memory().to(self.device, non_blocking=True)
        self.offsets = table
        self.schedule = self._schedule()
        n = self.n_tensors
        self._role_aligned = [all(a % 16 == 0 for a in addresses[k * n:(k + 1) * n]) for k in range(len(roles))]
        self.aligned = all(self._role_aligned)
        self._addresses = addresses

    def move_role(self, role: int, addresses: np.ndarray, aligned: bool) -> None:
        """Point one role at new tensors of the same sizes, layouts and dtype (checked by the
        caller) at ``addresses`` (int64, in the plan's tensor order): the gradients after
        ``zero_grad(set_to_none=True)`` and a backward. One row of the table is rewritten,
        stream-ordered after the launches that read the old one; ``aligned``: every address is a
        multiple of 16 bytes. The role's base is then the caller's to ``point`` at the tensor at
        ``addresses[0]`` before a launch."""
        shift = self._element_sizes[role].bit_length() - 1  # exact: the addresses are aligned to it
        row = torch.from_numpy((addresses - addresses[0]) >> shift)
        if self.device.type == "cuda":
            row = row.pin_memory()
        self.offsets[role].copy_(row, non_blocking=True)
        self.bases[role] = None
        self._role_aligned[role] = aligned
        self.aligned = all(self._role_aligned)
        self._addresses = None  # the whole-table address cache no longer describes the table

    def point(self, role: int, first: torch.Tensor) -> None:
        """Make ``first`` (the role's tensor 0, at the address the table was built from; a complex
        tensor is taken as its real view) the role's base pointer for the next launch."""
        self.bases[role] = torch.view_as_real(first) if first.is_complex() else first

    def release(self, role: int | None = None) -> None:
        """Drop the plan's reference to one role's base tensor (all roles with ``None``), so that a
        plan kept between steps keeps no tensor alive: a gradient freed by
        ``zero_grad(set_to_none=True)``, or a functional caller's tensors. ``refresh`` or
        ``point`` gives it back before the next launch."""
        if role is None:
            self.bases = [None] * len(self.bases)
        else:
            self.bases[role] = None

    def element_size(self, role: int) -> int:
        return self._element_sizes[role]


class PlanCache:
    """Launch plans by group key, rebuilt when the group's tensor sizes change."""

    def __init__(self):
        self._plans: dict = {}

    def get(self, key, roles: list[list[torch.Tensor]], plan_type: type = LaunchPlan) -> LaunchPlan:
        plan = self._plans.get(key)
        if plan is None or type(plan) is not plan_type or not plan.matches(roles):
            plan = plan_type(roles)
            self._plans[key] = plan
        else:
            plan.refresh(roles)
        return plan

    def clear(self) -> None:
        self._plans.clear()


class ThreadPlans(threading.local):
    """A ``PlanCache`` per thread (``.plans``), for the callers that keep no plans of their own
    (the functional API, gradient clipping): a plan points at its caller's tensors from
    ``refresh`` to the launch, so two threads must never share one."""

    def __init__(self):
        self.plans = PlanCache()


def plan_launches(roles: dict, role_names: tuple, plans: PlanCache, key,
                  plan_type: type = LaunchPlan) -> list[tuple[LaunchPlan, list]]:
    """Split one validated launch (``roles``: role name → list aligned with the first role's, or
    ``None`` for a role the kernel's flags leave untouched) into groups sharing (device, dtype of
    every role), and return ``(plan, indices)`` for each: a LaunchPlan pointed at the tensors'
    current storage, and which of the lists' positions it covers, in order. An absent role is
    filled with the first role's tensors as a placeholder. ``plan_type``: ``LaunchPlan`` for the
    shared walk, or an algorithm's own (``Algorithm.tiles``: ``gpuopt._adafactor.TilePlan``)."""
    first = roles[role_names[0]]
    present = [name for name in role_names if roles.get(name) is not None]
    keys = list(zip([t.device for t in first], *[[t.dtype for t in roles[name]] for name in present]))
    if keys.count(keys[0]) == len(keys):  # the common case: one group
        buckets = {keys[0]: list(range(len(first)))}
    else:
        buckets = {}
        for i, k in enumerate(keys):
            buckets.setdefault(k, []).append(i)
    launches = []
    for bucket_key, index in buckets.items():
        ordered = []
        for name in role_names:
            tensors = roles.get(name)
            if tensors is None:
                tensors = first
            ordered.append(tensors if len(index) == len(first) else [tensors[i] for i in index])
        launches.append((plans.get((key, bucket_key), ordered, plan_type), index))
    return launches


# ------------------------------------------------------------------ one step, planned ----------

GRAD_ROLE = 1  # every optimizer kernel's roles begin ("param", "grad", ...)
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


@dataclass
class Bucket:
    """The tensors of one call (a param group, a functional call) that share a device and every
    role's dtype, updated by one launch: their ``LaunchPlan``, the launch's precision flags
    (``bucket_precision``), and where they are in the call's lists."""

    plan: LaunchPlan
    has_master: bool
    stochastic_rounding: bool
    positions: list
    sum_groups: tuple = ()  # process groups the tensors are sharded over: whole-tensor sums are all-reduced there


def step_options(algorithm, options: dict) -> _launch.StepOptions:
    """``algorithm``'s launch arguments (a ``kernels._multi_tensor.Algorithm``) from ``options``
    (its keyword arguments but ``lr``, which is read at every launch), worked out once: the
    kernel's hyperparameters packed by name in the order of ``algorithm.hyper``."""
    options = {name: plain_number(value) for name, value in options.items()}
    values, flags = algorithm.hyperparameters(**options)
    return _launch.StepOptions(tuple(float(values[name]) for name in algorithm.hyper), flags,
                               has_step(algorithm, options))


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
    return (("step",) if has_step(algorithm, options) else ()) + tuple(algorithm.states(options))


def has_step(algorithm, options: dict) -> bool:
    """``options`` make the kernel read and advance the ``step`` role."""
    return algorithm.uses_step is None or algorithm.uses_step(options)


def bucket_precision(plan, master_role: int | None, has_masters: bool, stochastic_rounding: bool):
    """(HAS_MASTER, STOCHASTIC_ROUNDING) for one bucket: a master copy only for bf16/fp16
    params (fp32 params in the same call carry themselves as a stand-in), stochastic rounding only
    for bf16 params without one."""
    param_dtype = plan.bases[0].dtype
    low_precision = param_dtype in (torch.bfloat16, torch.float16)
    has_master = (has_masters and low_precision and master_role is not None
                  and plan.bases[master_role].dtype == torch.float32)
    return has_master, bool(stochastic_rounding) and not has_master and param_dtype == torch.bfloat16


def prepare_buckets(name: str, roles: dict, algorithm, plans: PlanCache, key, stochastic_rounding: bool,
                    plan_type: type = LaunchPlan) -> list[Bucket]:
    """Validate one call's tensors for ``algorithm`` (``gpuopt._validate.check_roles``) and split
    them into buckets. The slow path, shared by the functional API (every call) and the optimizer
    classes (only when something changed)."""
    roles = real_views(roles)
    role_names = algorithm.roles
    check_roles(name, roles, role_names, algorithm.state_shapes)
    has_masters = roles.get("master") is not None
    master_role = role_names.index("master") if "master" in role_names else None
    return [Bucket(plan, *bucket_precision(plan, master_role, has_masters, stochastic_rounding), index)
            for plan, index in plan_launches(roles, role_names, plans, key, plan_type)]


def dense_grads(name: str, algorithm, grads, weight_decay):
    """The gradients as ``algorithm`` takes them. Sparse ones (``nn.Embedding(sparse=True)``) are
    made dense for the algorithms torch takes them in (SGD, Adagrad: ``Algorithm.sparse_grads``):
    there a zero gradient element leaves the parameter and state exactly as torch's sparse update
    leaves an absent one (SGD's momentum decays everywhere in both). Other algorithms get them
    unchanged, for ``check_params_and_grads`` to refuse with torch's message. Complex ones are
    refused for an algorithm that cannot update them (``Algorithm.complex_params``)."""
    if not algorithm.complex_params and any(g is not None and g.is_complex() for g in grads):
        raise RuntimeError(f"{name} does not support complex parameters: its update is not elementwise on the "
                           "real and imaginary parts (view them as real with torch.view_as_real)")
    rule = algorithm.sparse_grads
    if rule is None or all(g is None or g.layout is torch.strided for g in grads):
        return grads
    if rule == "without weight decay" and weight_decay != 0:
        raise RuntimeError("weight_decay option is not compatible with sparse gradients")
    return [g if g is None or g.layout is torch.strided else g.to_dense() for g in grads]


def run_functional(name: str, algorithm, roles: dict, options: dict, *, lr, grad_scale, found_inf, seed,
                   stochastic_rounding, epoch=None, plan_type: type = LaunchPlan) -> None:
    """The functional API's path: the caller's lists are new every call, so they are checked every
    call (params and grads, then every role), grads copied to their params' layout if needed,
    then one launch per (device, dtypes) group. (An algorithm without a ``grad`` role, Muon's
    weight update, skips what concerns gradients.)"""
    if not roles["param"]:
        return
    missing = [role for role in needed_roles(algorithm, options) if roles.get(role) is None]
    if missing:  # the kernel would write them: refused, as torch's functional API refuses them
        raise ValueError(f"{name}: the {' and '.join(missing)} tensors are None, but these options update them; "
                         "pass one tensor per parameter (zeros for a new state)")
    has_grads = "grad" in algorithm.roles
    sharded = any_dtensor(roles["param"])
    if sharded:  # DTensors: each rank updates its local shards
        if has_grads:
            check_sharded_pairs(name, roles["param"], roles["grad"])
        sharded_params, roles = roles["param"], local_roles(roles)
    params = roles["param"]
    if has_grads:
        roles = dict(roles, grad=dense_grads(name, algorithm, roles["grad"], options.get("weight_decay", 0.0)))
        check_params_and_grads(name, params, roles["grad"])
        roles = dict(roles, grad=[matching_layout(g, p) for g, p in zip(roles["grad"], params)])
    buckets = prepare_buckets(name, roles, algorithm, _FUNCTIONAL_PLANS.plans, (name, algorithm.roles),
                              stochastic_rounding, plan_type)
    for bucket in buckets:
        if sharded and algorithm.sums:
            bucket.sum_groups = shard_groups(name, [sharded_params[i] for i in bucket.positions])
        if algorithm.tiles:  # (whole tensors' sizes; which rows are sharded: gpuopt._adafactor.TilePlan.shard)
            bucket.plan.shard([(sharded_params if sharded else params)[i] for i in bucket.positions])
    device = params[0].device
    step_args = StepArgs(device, on_device(grad_scale, device), on_device(found_inf, device), seed, epoch)
    launch_options = step_options(algorithm, options)
    for bucket in buckets:
        _launch.launch_step(algorithm, bucket, launch_options, step_args, lr)
        bucket.plan.release()  # the cache of plans keeps none of the caller's tensors alive


def on_device(t, device):
    """AMP tensors arrive on the scaler's device; the kernel needs them on the parameters'."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    return t.to(device=device, dtype=torch.float32)
