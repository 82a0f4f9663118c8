"""Reusing validated work: the one seam behind which gpuopt's host fast paths live.

The plain path validates everything a kernel will touch, plans, and launches, on every call
(``_multi_tensor.prepare_buckets``, ``_batch_norm.batch_norm_planned``); it stands alone. This
module keeps what it validated and says when that may be reused:

* an optimizer param group's buckets (``PreparedGroup``), while the optimizer's state is
  unchanged (``OptimizerState`` bumps a ``Generation`` on every change), the group's options
  are the same objects, and ``PreparedGroup.same_tensors`` finds every parameter, state and
  gradient where it was with the validated layout (gradients that alone moved rewrite one row
  of the plan's table);
* a batch-norm module's last call (``ModulePlan``), while its options are equal and its tensors
  have the recorded layouts and addresses.

Both compare layouts with ``_validate.layout_check`` (torch's TensorGuards, probed once); where
it is unavailable nothing is reused. Why it exists, measured: ``bench/NOTES.md`` ("host path").
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ._batch_norm import BatchNormCall, BatchNormFunction
from ._batch_norm_launch import Passes
from ._distributed import is_dtensor, local
from ._multi_tensor import GRAD_ROLE
from ._validate import layout_check

class Generation:
    """A counter every optimizer state dict bumps when it changes: the fast path's cue to re-validate."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


def _bumps(method):
    def wrapper(self, *args, **kwargs):
        self._generation.value += 1
        return method(self, *args, **kwargs)
    wrapper.__name__ = method.__name__
    return wrapper


def _tracked(cls):
    """Make every dict mutator of ``cls`` that it does not define itself bump the generation."""
    for name in ("__setitem__", "__delitem__", "__ior__", "pop", "popitem", "clear", "update", "setdefault"):
        if name not in vars(cls):
            setattr(cls, name, _bumps(getattr(dict, name)))
    return cls


@_tracked
class ParamState(dict):
    """One parameter's state (``opt.state[p]``): a plain dict that bumps its optimizer's
    generation on every change, so a state a user replaces (``opt.state[p]["exp_avg"] = ...``) is
    validated before the kernel touches it."""

    __slots__ = ("_generation",)

    def __init__(self, generation, *args):
        super().__init__(*args)
        self._generation = generation

    def __reduce__(self):  # pickles (and deep-copies) as the plain dict it is
        return dict, (dict(self),)


@_tracked
class OptimizerState(defaultdict):
    """``opt.state``: parameter → ``ParamState`` (a plain dict put in is converted), bumping the
    generation on every change."""

    def __init__(self, generation, items=()):
        super().__init__(None)
        self._generation = generation
        for key, value in dict(items).items():
            dict.__setitem__(self, key, ParamState(generation, value))

    def __missing__(self, key):
        value = ParamState(self._generation)
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key, value):
        self._generation.value += 1
        dict.__setitem__(self, key, value if isinstance(value, ParamState) else ParamState(self._generation, value))

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return dict.__getitem__(self, key)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):
        return _plain_state, (dict(self),)


def _plain_state(items):
    state = defaultdict(dict)
    state.update((k, dict(v)) for k, v in items.items())
    return state


_GRAD = operator.attrgetter("grad")
_LOCAL_TENSOR = operator.attrgetter("_local_tensor")  # a DTensor's local shard (see _distributed.local)
_ADDRESS = torch.Tensor.data_ptr


def grad_addresses(grads) -> tuple[tuple, list]:
    """``(addresses, present)``: the gradients' addresses (-1 where a parameter has none) and the
    gradients there are. Cheap when every parameter has an ordinary strided gradient: one C-level
    map, and ``present`` is ``grads`` itself."""
    try:
        return tuple(map(_ADDRESS, grads)), grads
    except (TypeError, RuntimeError):  # a missing gradient, or a tensor without storage (sparse)
        return tuple(map(_address, grads)), [g for g in grads if g is not None]


def fingerprint(params, grads) -> tuple:
    """What a captured step (``gpuopt.graphed_step``) read through ``param_groups`` and ``.grad``:
    the parameters by identity, the gradients' addresses and strides."""
    return tuple(map(id, params)), grad_addresses(grads)[0], tuple(map(_strides, grads))


def _address(t):
    if t is None:
        return -1
    if t.layout is not torch.strided or is_dtensor(t):  # sparse; a DTensor (no storage of its own)
        return object()  # equal to nothing: such a step is always validated (refused, or made local)
    return t.data_ptr()


def _strides(t):
    return None if t is None or t.layout is not torch.strided else t.stride()


@dataclass
class PreparedGroup:
    """One param group's validated launches, reused by every step while nothing changed.

    It holds the tensors it validated except the gradients: a gradient freed by
    ``zero_grad(set_to_none=True)`` is freed (the plans point at the current ones only during a
    step's launches), while the parameters and states, which the optimizer keeps anyway, are held
    with their addresses at validation, so that one compare tells that none of them was moved
    through ``.data`` (which bumps no generation). Of the gradients it keeps their addresses and
    a layout check (``_validate.layout_check``: sizes, strides, dtypes, devices, no reference).

    A gradient's address alone is not enough: after ``zero_grad(set_to_none=True)`` the
    allocator may hand the next gradient the same address, and a gradient assigned by hand may be
    a view there with other strides (``p.grad = g.t()``, or an expanded tensor whose storage is
    smaller than the parameter)."""

    params: tuple  # the group's parameters (compared by identity; DTensors as given)
    grad_addresses: tuple | None  # None: cannot be reused (a gradient had to be copied to its param's layout)
    grad_layout: object  # layout_check of the gradients present at validation (when reusable)
    generation: int
    structure: tuple
    buckets: list  # [_step.Bucket], positions in the group's param list
    movable: bool = False  # every parameter had a gradient: moved gradients rewrite one table row
    touched: tuple = ()  # params, states, master copies of the launches (not grads)
    touched_addresses: tuple = ()
    grad_copies: list | None = None  # gradients copied into their param's layout, for this step's launch
    options: tuple | None = None  # the group's options ``step_options`` read (None: read again every step)
    step_options: object = None  # _launch.StepOptions
    sharded: bool = False  # DTensor parameters: the addresses and launches are of their local tensors

    def same_tensors(self, params) -> bool:
        """The fast path's check: the same parameters, every parameter and state where it was
        validated (``p.data = ...`` and ``state.data = ...`` move a tensor without telling
        anyone), and the gradients where they were with the validated layout — or moved
        elsewhere with it (``move_grads``)."""
        if self.grad_addresses is None:
            return False
        if (len(params) != len(self.params) or not all(map(operator.is_, params, self.params))
                or tuple(map(_ADDRESS, self.touched)) != self.touched_addresses):
            return False
        grads = list(map(_GRAD, params))
        if self.sharded:
            try:  # C-level attribute reads; a missing gradient (None) takes the general path
                grads = list(map(_LOCAL_TENSOR, grads))
            except AttributeError:
                grads = list(map(local, grads))
        addresses, present = grad_addresses(grads)
        unmoved = addresses == self.grad_addresses
        if not (unmoved or (self.movable and present is grads)):  # a gradient appeared or vanished, ...
            return False
        if not self.grad_layout.check(*present):  # (the validated count of gradients, by now)
            return False
        if not unmoved and not self.move_grads(np.array(addresses, dtype=np.int64)):
            return False
        self.grad_addresses = addresses
        return True

    def set_options(self, options, step_options) -> None:
        # Held, so that identity is exact (an object still referenced cannot share its id with a
        # new one). An option that can change in place (betas as tensors, or as a list edited
        # after a checkpoint went through JSON/YAML) is read again every step.
        self.options = None if any(map(is_mutable, options)) else options
        self.step_options = step_options

    def move_grads(self, addresses: np.ndarray) -> bool:
        """The gradients alone moved (``zero_grad(set_to_none=True)`` and a new backward), with
        the validated layout, every parameter having one (both checked by the caller), to
        ``addresses`` (int64, one per parameter): if they are aligned, rewrite the gradient row
        of each plan's table and return True; else False (validate all)."""
        moves = []
        for bucket in self.buckets:
            plan, index = bucket.plan, bucket.positions
            mine = addresses if len(index) == len(addresses) else addresses[index]
            low_bits = int(np.bitwise_or.reduce(mine))  # (element sizes are powers of 2: one OR, no modulo)
            if low_bits & (plan.element_size(GRAD_ROLE) - 1):  # misaligned: the slow path explains it
                return False
            moves.append((plan, mine, not low_bits & 15))
        for plan, mine, aligned in moves:
            plan.move_role(GRAD_ROLE, mine, aligned)
        return True


def is_mutable(value) -> bool:
    """An option whose value can change while it stays the same object: a tensor, a list, a dict."""
    return isinstance(value, (torch.Tensor, list, dict)) or (isinstance(value, tuple) and any(map(is_mutable, value)))


def by_value(value):
    """What of an option ``_graph_key`` compares by value: a list's items (as a tuple), else None."""
    return tuple(map(by_value, value)) if isinstance(value, (list, tuple)) else (
        value if isinstance(value, (int, float, bool, str)) else None)


class ModulePlan:
    """A batch-norm module's last call, kept to call ``BatchNormFunction`` directly next time
    (``gpuopt.nn``'s modules): valid while the module's options are equal and its tensors
    have the layouts they had (``_validate.layout_check``), the input its 16-byte alignment, and
    weight, bias, running statistics and counter their addresses (a tensor replaced, or moved
    through ``.data``, is checked again) — and neither a running statistic nor the counter
    requires grad (an error to raise, on the full path). Anything else takes the full path,
    which makes a new plan. The layer's kernels count the batch when the module tracks it
    (``passes.count``: a plan is made only by a call that ran them, so the two agree)."""

    __slots__ = ("options", "addresses", "layouts", "passes", "pass_buffers")

    def __init__(self, options: tuple, tensors: tuple, passes: Passes, pass_buffers: bool):
        self.options, self.passes, self.pass_buffers = options, passes, pass_buffers
        self.addresses = _addresses(tensors)
        self.layouts = layout_check([t for t in tensors if t is not None])

    def _matches(self, tensors: tuple) -> bool:
        try:
            return (self.layouts is not None and _addresses(tensors) == self.addresses
                    and self.layouts.check(*[t for t in tensors if t is not None]))
        except (AttributeError, RuntimeError, TypeError):  # not a tensor, or a tensor without storage
            return False

    def run(self, options: tuple, input, weight, bias, running_mean, running_var, num_batches_tracked):
        """The output, or None (nothing done) when the plan does not fit this call."""
        if (options != self.options
                or not self._matches((input, weight, bias, running_mean, running_var, num_batches_tracked))
                or (running_mean is not None and running_mean.requires_grad)
                or (running_var is not None and running_var.requires_grad)
                or (num_batches_tracked is not None and num_batches_tracked.requires_grad)):
            return None
        if not self.pass_buffers:
            running_mean = running_var = None
        return BatchNormFunction.apply(input, weight, bias, BatchNormCall(
            input, running_mean, running_var, num_batches_tracked if self.passes.count else None, self.passes))


def _addresses(tensors: tuple) -> tuple:
    """A module call's tensors as ``ModulePlan`` compares them: the input's 16-byte alignment,
    the others' exact addresses (None for an absent one)."""
    input, *others = tensors
    return (input.data_ptr() % 16, *(None if t is None else t.data_ptr() for t in others))
