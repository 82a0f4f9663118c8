"""``FusedOptimizer``, the ``torch.optim.Optimizer`` base class of gpuopt's optimizers: states made
when needed, ``state_dict`` both ways, and the step — validated and planned by the plain path
(``_multi_tensor``), reused while nothing changed (``_reuse``), launched (``_launch``)."""

from __future__ import annotations

import operator
import warnings
from collections import OrderedDict

import torch
import torch.optim.optimizer as _torch_optimizer

from . import _traced
from ._distributed import DTensor, check_sharded_pairs, is_dtensor, like_dtensor, local, local_roles, shard_groups
from ._launch import launch_step
from ._multi_tensor import (GRAD_ROLE, LaunchPlan, PlanCache, StepArgs, dense_grads, has_step, needed_roles,
                            on_device, prepare_buckets, step_options)
from ._reuse import Generation, OptimizerState, PreparedGroup, by_value, fingerprint, grad_addresses
from .clip import get_total_norm
from ._validate import check_params_and_grads, follow_layout, layout_check, like_param, matching_layout

class _PendingClip:
    """``opt.clip_grad_norm_``'s ``(max_norm, norm)`` until the step that applies it succeeds. A
    holder object, not an attribute value: a wrapper that copies the optimizer's ``__dict__``
    (Lightning's ``LightningOptimizer``) shares it, so a clip requested through the wrapper reaches
    the step of the optimizer it wraps."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None


def _draw_seed() -> int:
    """A stochastic-rounding seed from torch's default generator (one draw: ``torch.manual_seed``
    makes runs repeatable)."""
    return int(torch.randint(0, 2**30, (), dtype=torch.int64).item())


_GRAD = operator.attrgetter("grad")
_NO_STATE: dict = {}
_GLOBAL_PRE_HOOKS = _torch_optimizer._global_optimizer_pre_hooks  # torch's registries (dicts), read directly
_GLOBAL_POST_HOOKS = _torch_optimizer._global_optimizer_post_hooks
_profiler_enabled = torch._C._autograd._profiler_enabled


class FusedOptimizer(torch.optim.Optimizer):
    """Base of gpuopt's optimizers: ``torch.optim.Optimizer`` with one kernel launch per group of
    parameters sharing (param group, device, param/grad/state dtypes).

    A subclass names its algorithm (``_algorithm``, a ``kernels._multi_tensor.Algorithm``: roles,
    update, which states its options need, its launch arguments) and maps a param group to the
    algorithm's options (``_options(group)``: the keyword arguments ``gpuopt.functional`` takes,
    without ``lr``); its constructor checks and stores the options as ``torch.optim`` does.
    Everything else — states made when needed, validation, buckets, the step — is here.

    The host path of a step (what the CPU spends around the launch): everything the kernel
    assumes is validated (``gpuopt._validate``) when a group is new or anything changed — a
    parameter or gradient at a new address, a gradient appearing or vanishing, a state replaced
    or added (``opt.state`` tracks its own changes), a loaded state_dict, an option that changes
    the roles. Otherwise a step is one cheap check per group (``PreparedGroup.same_tensors``)
    and the launch.

    Extra options, on every subclass:
        state_dtype: dtype of the optimizer states; ``None`` (default) uses each parameter's dtype
            as PyTorch does; ``torch.float32`` keeps fp32 states for bf16/fp16 parameters.
        master_weights: keep an fp32 copy of every low-precision parameter (``state["master_param"]``);
            the kernel updates the copy and writes the rounded value to the parameter in one pass.
        stochastic_rounding: round bf16 parameters stochastically (unbiased) when there is no
            master copy; fresh noise every step (an epoch on the device, advanced by every
            rounded launch: ``_epoch``), from a seed drawn once from torch's default generator,
            both kept in ``state_dict()``.

    With ``master_weights``, the master copy follows edits of its parameter: an element the
    parameter no longer rounds the master to (``p.data.clamp_()``, ``model.load_state_dict``)
    restarts from the parameter's value at the next step (``kernels._multi_tensor.load_param``).
    """

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale / found_inf; no host sync
    _algorithm = None  # kernels._multi_tensor.Algorithm
    _initial_values: dict = {}  # state role → fill value (from the group) other than 0
    _copied_states: tuple = ()  # state roles that start as a copy of the parameter
    _plan_type = LaunchPlan  # the launch plan of the algorithm's kernels (Adafactor's: gpuopt._adafactor.TilePlan)

    # The options every gpuopt optimizer has; a subclass's defaults may leave out those it does
    # not expose (a new algorithm's constructor can be just its own hyperparameters).
    _COMMON_DEFAULTS = dict(state_dtype=None, master_weights=False, stochastic_rounding=False, maximize=False,
                            foreach=None, fused=None, capturable=False, differentiable=False)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._algorithm is not None:  # callable from a compiled graph under this key
            cls._traced_op = _traced.register(cls.__name__, cls._algorithm)
            cls._traced_options = _traced.option_names(cls._algorithm)

    def __init__(self, params, defaults):
        self._generation = Generation()
        self._clip = _PendingClip()
        self._seed = None  # the stochastic-rounding seed, drawn once a group asks for it
        self._epochs = {}  # device → the stochastic-rounding epoch there (see _epoch)
        self._first_epoch = 0  # where a new epoch counter starts (a loaded state dict's count)
        super().__init__(params, {**self._COMMON_DEFAULTS, **defaults})
        self._reset_host_caches()

    def _reset_host_caches(self):
        if not isinstance(self.state, OptimizerState) or self.state._generation is not self._generation:
            self.state = OptimizerState(self._generation, self.state)
        self._generation.value += 1
        self._plans = PlanCache()
        self._prepared: dict[int, PreparedGroup] = {}
        # The options a group's step options are made from; lr is read at every launch instead.
        self._option_names = tuple(name for name in self.defaults if name != "lr")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._generation = getattr(self, "_generation", None) or Generation()
        self._clip = getattr(self, "_clip", None) or _PendingClip()
        self._seed = getattr(self, "_seed", None)
        self._epochs = getattr(self, "_epochs", None) or {}
        self._first_epoch = getattr(self, "_first_epoch", 0)
        self._reset_host_caches()

    def __getstate__(self):
        # torch's keeps defaults, state and param_groups; the seed and epochs go along, so that a
        # copy's stochastic rounding continues the original's.
        return {**super().__getstate__(), "_seed": self._seed, "_epochs": self._epochs,
                "_first_epoch": self._first_epoch}

    def add_param_group(self, param_group):
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # torch refuses sets itself
            param_group["params"] = params = list(params)  # as torch does; a generator is read once, here
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            # torch.optim warns and steps such a parameter twice; gpuopt updates all of a launch's
            # tensors at once, so a repeated tensor would race with itself: torch's warning, then
            # the error it announces.
            warnings.warn("optimizer contains a parameter group with duplicate parameters; in future, this will "
                          "cause an error; see github.com/pytorch/pytorch/issues/40967 for more information",
                          stacklevel=3)
            raise ValueError(f"{type(self).__name__}: a parameter group lists the same parameter twice; "
                             "list each parameter once")
        super().add_param_group(param_group)
        if self.param_groups[-1]["stochastic_rounding"] and self._seed is None:
            self._seed = _draw_seed()

    # -- state ------------------------------------------------------------------------------

    def _state_dtype(self, p, group):
        # A complex parameter's states are complex like it (as torch's); state_dtype is for real ones.
        return p.dtype if p.is_complex() else group["state_dtype"] or p.dtype

    def _zeros(self, p, group, fill=0.0):
        if p.is_complex():  # every real component starts at `fill`, as in torch (e.g. Adagrad's sum)
            fill = complex(fill, fill)
        return torch.full_like(p, fill, dtype=self._state_dtype(p, group), memory_format=torch.preserve_format)

    def _options(self, group) -> dict:
        """The algorithm's options (``Algorithm.hyperparameters``' keyword arguments) from a group."""
        raise NotImplementedError

    def _uses_step(self, group) -> bool:
        """The group's state has a ``step`` (SGD's only with momentum; see gpuopt.SGD)."""
        return has_step(self._algorithm, self._options(group))

    def _state_roles(self, group) -> tuple:
        """The state keys (= kernel roles) that the group's options need, besides step and master."""
        return self._algorithm.states(self._options(group))

    @staticmethod
    def _uses_master(p, group) -> bool:
        return bool(group["master_weights"]) and p.dtype in (torch.bfloat16, torch.float16)

    def _complete_state(self, state, p, group):
        """Make whatever state the group's options need and ``p`` lacks: all of it at a parameter's
        first step, one role when an option is switched on mid-run (amsgrad, centered, ...)."""
        if self._uses_step(group) and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if self._uses_master(p, group) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        shapes = self._algorithm.state_shapes
        for role in self._state_roles(group):
            if role in shapes:  # a state of its own shape (or none for this parameter): contiguous zeros,
                shape = shapes[role](p.shape)  # placed as its parameter when that is a DTensor
                if shape is not None and state.get(role) is None:
                    zeros = torch.zeros(shape, dtype=self._state_dtype(p, group), device=p.device)
                    state[role] = like_dtensor(zeros, p)
            elif state.get(role) is None and role in self._copied_states:
                state[role] = p.detach().to(dtype=self._state_dtype(p, group), memory_format=torch.preserve_format,
                                            copy=True)
            elif state.get(role) is None:
                fill = group[self._initial_values[role]] if role in self._initial_values else 0.0
                state[role] = self._zeros(p, group, fill)

    def _follow_layout(self, state, p):
        """A parameter whose memory layout changed takes its states along (``follow_layout``)."""
        for key, value in list(state.items()):
            if key != "step" and key not in self._algorithm.state_shapes and isinstance(value, torch.Tensor):
                moved = follow_layout(value, p)
                if moved is not value:
                    state[key] = moved

    def state_dict(self):
        """As ``torch.optim.Optimizer.state_dict``, with each parameter's state as a plain dict
        (``torch.load(weights_only=True)`` reads it back); the tensors are the live ones, as torch's.
        With stochastic rounding it also holds ``"stochastic_rounding_seed"`` and
        ``"stochastic_rounding_epoch"`` (the launch count, read from the device; torch's loader
        ignores both keys), so a resumed run rounds as the original would have."""
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(value) for key, value in state_dict["state"].items()}
        if self._seed is not None:
            state_dict["stochastic_rounding_seed"] = self._seed
            state_dict["stochastic_rounding_epoch"] = max([int(e.item()) for e in self._epochs.values()],
                                                          default=self._first_epoch)
        return state_dict

    def _required_state(self, group, p) -> tuple:
        """The state keys parameter ``p``'s non-empty loaded state must have for ``group``'s options
        (torch raises ``KeyError`` at the next step without them; gpuopt at the load)."""
        shapes = self._algorithm.state_shapes
        return tuple(key for key in needed_roles(self._algorithm, self._options(group))
                     if key not in shapes or shapes[key](p.shape) is not None)

    def _state_shape(self, key, p):
        """The shape of parameter ``p``'s state ``key`` (``Algorithm.state_shapes``; None: ``p``
        keeps no such state)."""
        shapes = self._algorithm.state_shapes
        return shapes[key](p.shape) if key in shapes else p.shape

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, then with gpuopt's placement: ``step`` as
        a float32 tensor on the parameter's device (a Python number too, as older checkpoints hold
        it), states in the group's ``state_dtype`` and the parameter's memory layout, the master
        copy in fp32, each cast from the checkpoint's own values (never through the parameter's
        lower precision) and copied, never aliased with the checkpoint's tensors; a sparse state
        (torch's SGD momentum of an ``Embedding(sparse=True)``) is made dense.

        The load pre-hooks run first (a hook may edit the state dict or return a new one), and the
        post-hooks last, on the placed states. Then everything is checked before anything
        changes: a state whose size does not match its parameter, and a parameter's state that
        lacks a key the options need (a checkpoint of another optimizer, or with an entry
        missing), are refused."""
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        for hook in list(pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        name = type(self).__name__
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        loaded_group = {pid: {**self.defaults, **g} for g in state_dict["param_groups"] for pid in g["params"]}
        originals = {pid: dict(s) for pid, s in state_dict["state"].items()}
        for index, (pid, p) in enumerate(zip(ids, params)):
            state = originals.get(pid, {})
            for key, value in state.items():
                if key == "step":
                    if isinstance(value, torch.Tensor) and value.numel() != 1:
                        raise ValueError(f"loaded state 'step' of parameter {index} has {value.numel()} elements")
                elif isinstance(value, torch.Tensor) and value.shape != self._state_shape(key, p):
                    expected = self._state_shape(key, p)
                    raise ValueError(f"loaded state '{key}' of parameter {index} has shape {tuple(value.shape)}, "
                                     f"but the parameter has shape {tuple(p.shape)}" +
                                     ("" if expected == p.shape else f" and keeps no {key}" if expected is None
                                      else f" and keeps a {key} of shape {tuple(expected)}"))
            required = self._required_state(loaded_group[pid], p)
            missing = [key for key in required if state and key not in state]
            if missing:
                raise KeyError(f"{name}.load_state_dict: the state of parameter {index} has no "
                               f"{', '.join(map(repr, missing))} (it has {sorted(state)}); a checkpoint of another "
                               f"optimizer, or with an entry missing? gpuopt.{name} with these options keeps "
                               f"{list(required)}")
        for state in originals.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.layout is not torch.strided:
                    state[key] = value.to_dense()
        # torch's loader maps the checkpoint onto the parameters; its hooks ran above and run below.
        self._optimizer_load_state_dict_pre_hooks = self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": originals})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(ids, params):
            if pid not in originals:
                continue
            state, group = self.state[p], group_of[id(p)]
            for key, value in originals[pid].items():
                if key == "step":
                    step = value.detach().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                    state[key] = step.to(device=p.device, dtype=torch.float32, copy=True)
                elif key in self._algorithm.state_shapes and isinstance(value, torch.Tensor):
                    placed = like_dtensor(value, p).to(device=p.device, dtype=self._state_dtype(p, group), copy=True)
                    state[key] = placed if is_dtensor(p) else placed.contiguous()
                elif isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                    dtype = torch.float32 if key == "master_param" else self._state_dtype(p, group)
                    state[key] = like_param(like_dtensor(value, p).to(p.device), p, dtype)
            self._after_load(state, p, group)
        if state_dict.get("stochastic_rounding_seed") is not None:
            self._seed = int(state_dict["stochastic_rounding_seed"])
            self._first_epoch = int(state_dict.get("stochastic_rounding_epoch", 0))
            self._epochs = {}
        self._reset_host_caches()
        for hook in list(post_hooks.values()):
            hook(self)

    def _after_load(self, state, p, group):
        """A subclass's fix-ups of a loaded state (gpuopt.SGD: a torch buffer has no step)."""
        if self._uses_master(p, group) and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)

    # -- step -------------------------------------------------------------------------------

    def step(self, *args, **kwargs):
        """``step(closure=None, *, grad_scale=None, found_inf=None)``: one optimizer step, one
        kernel launch per (param group, device, dtypes).

        ``grad_scale`` / ``found_inf`` (device tensors) are AMP's: gradients are divided by
        ``grad_scale`` inside the kernel and the whole step is skipped on the device when
        ``found_inf`` is nonzero. ``torch.amp.GradScaler`` sets them as attributes, as it does for
        PyTorch's fused optimizers; both ways work.

        Step hooks (``register_step_pre_hook`` / ``register_step_post_hook``, and the global
        ``register_optimizer_step_pre_hook`` / ``_post_hook``) and the profiler's
        ``Optimizer.step#...`` range work as in torch: torch's own wrapper runs around
        the step whenever one is registered or the profiler is on, and only then. Inside
        ``torch.compile`` the step is traced into the graph as one ``gpuopt::<Class>_step``
        operator per param group (``gpuopt._traced``), once its states exist; the first step,
        and a step with hooks, runs eagerly (a graph break).
        """
        hooked = (_GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS or self._optimizer_step_pre_hooks
                  or self._optimizer_step_post_hooks)
        if torch.compiler.is_compiling():  # (the profiler's C-level query would itself break the graph)
            return self._hooked_step(*args, **kwargs) if hooked else _traced.traced_step(self, *args, **kwargs)
        if hooked or _profiler_enabled():
            return self._hooked_step(*args, **kwargs)
        return self._step(*args, **kwargs)

    step.hooked = True  # tells torch.optim.Optimizer not to wrap it (it would on every call, hooks or not)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False):
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters, fused into the next
        step: the total norm of their gradients (``gpuopt.get_total_norm``, DTensors included) is
        returned now, and the next ``step()`` multiplies each gradient by
        ``min(1, max_norm / (norm + 1e-6))`` as its kernel reads it — the gradients are read once
        for the norm, once by the step, and never rewritten. A non-finite norm skips that step
        on the device (as AMP's ``found_inf`` does), where torch would step with NaN gradients."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = get_total_norm(grads, norm_type, error_if_nonfinite)
        self._clip.value = (float(max_norm), local(norm))
        return norm

    def _begin_step(self, closure, grad_scale, found_inf):
        """What every step starts with (eager or traced): the closure's loss, computed with grad
        enabled, and AMP's tensors from the arguments or, as GradScaler sets them, the attributes,
        with a pending ``clip_grad_norm_`` folded in (its divisor into the scale, a non-finite
        norm into found_inf)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None) if grad_scale is None else grad_scale
        found_inf = getattr(self, "found_inf", None) if found_inf is None else found_inf
        clip = self._clip.value  # (cleared by the step that applies it, once its launches are made)
        if clip is not None:
            max_norm, norm = clip
            divisor = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)  # g / divisor = g · torch's coefficient
            grad_scale = divisor if grad_scale is None else grad_scale * divisor.to(grad_scale.device)
            skipped = (~torch.isfinite(norm)).float()
            found_inf = skipped if found_inf is None else torch.maximum(found_inf, skipped.to(found_inf.device))
        return loss, grad_scale, found_inf

    def _step(self, closure=None, *, grad_scale=None, found_inf=None):
        loss, grad_scale, found_inf = self._begin_step(closure, grad_scale, found_inf)
        if type(self.state) is not OptimizerState:  # `opt.state = ...` replaced it
            self._reset_host_caches()
        # Every group is validated before any launch: a group that fails leaves all unchanged.
        prepared_groups = []
        for index, group in enumerate(self.param_groups):
            prepared_groups.append(self._prepared_group(index, group))
        step_args = {}  # device → StepArgs
        for group, prepared in zip(self.param_groups, prepared_groups):
            params, lr = group["params"], group["lr"]
            for bucket in prepared.buckets:
                plan = bucket.plan
                args = step_args.get(plan.device)
                if args is None:
                    args = step_args[plan.device] = self._step_args(plan.device, grad_scale, found_inf)
                if prepared.grad_copies is None:  # else the plan points at the copies, made this step
                    grad = params[bucket.positions[0]].grad
                    plan.point(GRAD_ROLE, local(grad) if prepared.sharded else grad)
                launch_step(self._algorithm, bucket, prepared.step_options, args, lr)
                plan.release(GRAD_ROLE)
            prepared.grad_copies = None
        if self._after_launches is not None:
            self._after_launches(prepared_groups, step_args)
        self._clip.value = None
        return loss

    # What a step does after its launches, given each group's PreparedGroup and the step's
    # StepArgs by device (gpuopt.Muon: orthogonalize, then update the weights); None: nothing
    # (an attribute, not a no-op method: the steady step's host path is counted, test_host_path).
    _after_launches = None

    def _step_args(self, device, grad_scale, found_inf) -> StepArgs:
        return StepArgs(device, None if grad_scale is None else on_device(grad_scale, device),
                        None if found_inf is None else on_device(found_inf, device), self._seed or 0,
                        None if self._seed is None else self._epoch(device))

    def _epoch(self, device) -> torch.Tensor:
        """The stochastic-rounding epoch on ``device``: an int32 device tensor every rounded launch
        there reads into its noise and advances (``kernels._multi_tensor.finish_launch``), kept
        here rather than in a launch plan so that a new plan does not restart it."""
        epoch = self._epochs.get(device)
        if epoch is None:
            epoch = self._epochs[device] = torch.full((1,), self._first_epoch, dtype=torch.int32, device=device)
        return epoch

    # torch's wrapper of a step (profiler range, hooks), used when one is on; Dynamo breaks the graph here.
    _hooked_step = torch.compiler.disable(torch.optim.Optimizer.profile_hook_step(_step))

    def _prepared_group(self, index, group) -> PreparedGroup:
        """The group's validated launches. The fast path: the same options (by identity; ``lr``
        is read at every launch), no state changed, and ``same_tensors``: the same parameters,
        every parameter and state where it was, the gradients where they were with the
        validated layout (gradients that alone moved rewrite one table row). Anything else is
        validated again (``_prepare``)."""
        params = group["params"]
        prepared = self._prepared.get(index)
        options = tuple(map(group.get, self._option_names))
        if prepared is not None and (prepared.options is None or len(prepared.options) != len(options)
                                     or not all(map(operator.is_, prepared.options, options))):
            if prepared.structure == self._structure(group):  # new hyperparameters, the same tensors
                prepared.set_options(options, step_options(self._algorithm, self._options(group)))
            else:
                prepared = None
        if (prepared is None or prepared.generation != self._generation.value
                or not prepared.same_tensors(params)):
            prepared = self._prepare(index, group, params, list(map(_GRAD, params)), options)  # (DTensors as given)
        return prepared

    def _graph_key(self) -> tuple:
        """What a captured step (``gpuopt.graphed_step``) was made from: ``(values, objects)`` —
        the state generation, every group's fingerprint and the addresses of its parameters and
        states (compared by value), and every group's options and ``lr`` (compared by identity)."""
        values, objects = [self._generation.value], []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            values.append(fingerprint(params, list(map(_GRAD, params))))
            prepared = self._prepared.get(index)
            values.append(prepared and tuple(map(torch.Tensor.data_ptr, prepared.touched)))
            options = tuple(map(group.get, self._option_names))
            objects.extend(options)
            values.append(tuple(map(by_value, options)))  # (a list edited in place)
            objects.append(group["lr"])
        return tuple(values), tuple(objects)

    def _structure(self, group) -> tuple:
        """The group's options that decide which tensors a launch touches (a change re-validates)."""
        return (self._state_roles(group), self._uses_step(group), group["master_weights"], group["state_dtype"],
                group["stochastic_rounding"])

    @torch.no_grad()
    def _prepare(self, index, group, params, grads, options) -> PreparedGroup:
        """The slow path: validate the group's tensors, make missing states, and plan its launches."""
        name = type(self).__name__
        group_params = tuple(params)
        sharded = DTensor is not None and any(isinstance(p, DTensor) for p in params)  # (_distributed.any_dtensor)
        if sharded:  # DTensors (FSDP2, tensor parallel): each rank updates its local shards
            check_sharded_pairs(name, params, grads)
            grads = [local(g) for g in grads]
        addresses, present = grad_addresses(grads)  # as the fast path will see them
        chosen = [i for i, g in enumerate(grads) if g is not None]
        every_grad = len(chosen) == len(params)
        params = [params[i] for i in chosen]  # the states' keys
        local_params = [local(p) for p in params] if sharded else params
        grads = [grads[i] for i in chosen]
        densified = dense_grads(name, self._algorithm, grads, group.get("weight_decay", 0.0))
        buckets, touched, copies = [], (), None
        if params:
            check_params_and_grads(name, local_params, densified)  # before any state is made for them
            matched = [matching_layout(g, p) for g, p in zip(densified, local_params)]
            if densified is not grads or any(m is not g for m, g in zip(matched, grads)):
                copies = matched  # new every step: this preparation is never reused
            if group["stochastic_rounding"] and self._seed is None:  # (switched on after construction)
                self._seed = _draw_seed()
            for p in params:
                state = self.state[p]
                self._complete_state(state, p, group)  # a DTensor parameter's states are DTensors like it
                if not sharded:  # (a DTensor's local tensor is laid out by its owner: FSDP2's are contiguous)
                    self._follow_layout(state, p)
                if not state:  # as torch: no entry for a parameter without state (SGD without momentum)
                    dict.__delitem__(self.state, p)
            roles = self._roles(group, params, matched)
            if sharded:
                roles = local_roles(roles)
            buckets = prepare_buckets(name, roles, self._algorithm, self._plans, index, group["stochastic_rounding"],
                                      self._plan_type)
            for bucket in buckets:  # (positions in the group's param list)
                if sharded and self._algorithm.sums:
                    bucket.sum_groups = shard_groups(name, [params[i] for i in bucket.positions])
                if self._algorithm.tiles:  # (whole tensors' sizes; which rows are sharded)
                    bucket.plan.shard([params[i] for i in bucket.positions])
                bucket.positions = [chosen[i] for i in bucket.positions]
            touched = tuple(t for role, tensors in roles.items() if role != "grad" for t in tensors)
        grad_layout = layout_check(present) if copies is None and all(type(a) is int for a in addresses) else None
        reusable = grad_layout is not None  # (not with copied or sparse gradients, nor without a layout check)
        prepared = PreparedGroup(group_params, addresses if reusable else None, grad_layout,
                                  self._generation.value, self._structure(group), buckets,
                                  every_grad and bool(buckets), touched, tuple(map(torch.Tensor.data_ptr, touched)), copies)
        prepared.set_options(options, step_options(self._algorithm, self._options(group)))
        prepared.sharded = sharded
        self._prepared[index] = prepared
        return prepared

    def _roles(self, group, params, grads) -> dict:
        states = [self.state.get(p, _NO_STATE) for p in params]
        roles = {"param": params, "grad": grads}
        if self._uses_step(group):
            roles["step"] = [s["step"] for s in states]
        for role in self._state_roles(group):
            # (a parameter without the state, Adafactor's factors: its first state of the algorithm stands in)
            roles[role] = [s[role] if role in s else next(s[r] for r in self._state_roles(group) if r in s)
                           for s in states]
        if any(self._uses_master(p, group) for p in params):
            # Parameters without a master copy (fp32 ones) get their own value as a stand-in; they
            # land in a different bucket (dtype differs), where the master flag is off.
            roles["master"] = [s.get("master_param", p) for p, s in zip(params, states)]
        return roles


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

