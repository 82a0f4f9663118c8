"""``gpuopt.EMA``: the seed's running average (B.0.1.1) of a model's weights, one launch per update."""

from __future__ import annotations

import torch

from . import _launch
from ._arrays import as_array, as_tensor, caller_stream, is_array, kind_of
from ._distributed import any_dtensor, like_dtensor, local
from ._multi_tensor import prepare_buckets, step_options
from ._multi_tensor import PlanCache
from ._launch import check_kernel_device
from ._validate import follow_layout
from .kernels import ema as ema_kernel

_ADDRESS = torch.Tensor.data_ptr


class EMA:
    r"""Running average of parameters, updated in place by one fused kernel per (device, dtype).

    After each optimizer step call :meth:`update`; it applies the seed's running average

    .. math:: C_t = \gamma_t C_{t-1} + (1 - \gamma_t) c_t

    to every parameter ``c`` and its average ``C``. ``decay=γ`` keeps a moving average with constant
    γ; ``decay=None`` uses ``γ_t = (t-1)/t`` and keeps the exact mean of every value seen by
    ``update`` (the seed's study question; ``torch.optim.swa_utils``' SWA average).

    The averages start as a copy of the parameters (as ``torch.optim.swa_utils.AveragedModel`` and
    most EMA implementations do), rather than the seed's ``C_0 = 0``, which would bias early
    averages toward zero. With ``decay=None`` the start value is irrelevant: ``γ_1 = 0``.

    Args:
        params: an iterable of tensors (``model.parameters()``) or an ``nn.Module``.
        decay: γ in [0, 1), or ``None`` for the exact mean.

    Example::

        ema = gpuopt.EMA(model.parameters(), decay=0.999)
        for x, y in loader:
            loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
            ema.update()
        ema.copy_to()          # load the averaged weights into the model for evaluation
    """

    def __init__(self, params, decay: float | None = 0.999):
        if isinstance(params, torch.nn.Module):
            params = params.parameters()
        self.params = [p for p in params]
        # Arrays (NumPy, CuPy: gpuopt._arrays) are averaged through torch views of their memory; the
        # averages are then arrays of the same kind. _params/_averages: the tensors the kernel sees.
        kinds = {kind_of(p) for p in self.params if is_array(p)}
        if len(kinds) > 1 or (kinds and not all(map(is_array, self.params))):
            raise TypeError("EMA: pass torch tensors, or arrays of one library (NumPy or CuPy), not a mix")
        self._kind = kinds.pop() if kinds else None
        self._params = [as_tensor(p, f"EMA parameter {i}", written=False) for i, p in enumerate(self.params)] \
            if self._kind else self.params
        if not self.params:
            raise ValueError("EMA got an empty parameter list")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid decay value: {decay} (must be in [0, 1), or None for the exact mean)")
        for p in self._params:
            if not isinstance(p, torch.Tensor) or not (p.is_floating_point()):
                raise TypeError(f"EMA averages floating-point tensors, got {type(p).__name__} "
                                f"{getattr(p, 'dtype', '')}")
            check_kernel_device(p, "an EMA parameter")
        self.decay = decay
        self.num_updates = 0
        # A DTensor parameter's average is a DTensor placed like it (FSDP2: each rank averages its shard).
        self._averages = [p.detach().clone(memory_format=torch.preserve_format) for p in self._params]
        self.averages = [as_array(a, self._kind) for a in self._averages] if self._kind else self._averages
        self._sharded = any_dtensor(self._params)
        self._plans = PlanCache()
        self._prepared = None  # (fingerprint, launch plans) while the tensors stay where they were

    def gamma(self, t: int) -> float:
        """γ_t for update number ``t`` (counting from 1)."""
        return (t - 1) / t if self.decay is None else self.decay

    @torch.compiler.disable  # as the optimizers' step: eager inside torch.compile
    @torch.no_grad()
    def update(self) -> None:
        """One running-average step over all parameters: one kernel launch per (device, dtype).

        The tensors are validated (shape, layout, device, alignment, no overlap) when any of them
        is new or moved; otherwise the step is an address compare and the launches."""
        t = self.num_updates + 1
        gamma = self.gamma(t)
        params, averages = self._params, self._averages
        if self._sharded:
            params, averages = map(local, params), map(local, averages)
        fingerprint = (tuple(map(_ADDRESS, params)), tuple(map(_ADDRESS, averages)))
        if self._prepared is None or self._prepared[0] != fingerprint:
            self._prepared = (fingerprint, self._prepare())
        options = step_options(ema_kernel.AVERAGE, dict(gamma=gamma))
        with caller_stream(self._kind):
            for plan in self._prepared[1]:
                _launch.launch_update(ema_kernel.AVERAGE, plan, options.hyperparameters, options.flags)
        self.num_updates = t  # only once the launches are made: a failed update changes nothing

    def _prepare(self):
        """Validate and plan: averages follow a parameter whose memory layout changed (values kept);
        0-element parameters are skipped."""
        if not self._sharded and not self._kind:  # (a DTensor's or an array's layout is its owner's)
            self.averages = self._averages = [follow_layout(average, p) for average, p in zip(self._averages, self.params)]
        params, averages = [local(p) for p in self._params], [local(a) for a in self._averages]
        chosen = [i for i, p in enumerate(params) if p.numel()]
        if not chosen:
            return []
        roles = {"average": [averages[i] for i in chosen], "value": [params[i].detach() for i in chosen]}
        return [bucket.plan for bucket in prepare_buckets("EMA", roles, ema_kernel.AVERAGE, self._plans, "ema", False)]

    @torch.no_grad()
    def copy_to(self, params=None) -> None:
        """Copy the averages into ``params`` (default: the tracked parameters)."""
        params = self._params if params is None else list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        if len(params) != len(self._averages):
            raise ValueError(f"copy_to got {len(params)} tensors for {len(self._averages)} averages")
        params = [as_tensor(p, f"copy_to's {i}", written=True) if is_array(p) else p for i, p in enumerate(params)]
        for i, (p, average) in enumerate(zip(params, self._averages)):
            if p.shape != average.shape:  # (copy_ would broadcast)
                raise ValueError(f"copy_to: tensor {i} has shape {tuple(p.shape)}, its average {tuple(average.shape)}")
        for p, average in zip(params, self._averages):
            p.copy_(average)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "averages": list(self.averages)}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load averages (copied into this EMA's tensors, in their layout), decay and count; the
        whole state_dict is checked before anything changes."""
        averages, decay, num_updates = state_dict["averages"], state_dict["decay"], state_dict["num_updates"]
        if len(averages) != len(self._averages):
            raise ValueError(f"state_dict holds {len(averages)} averages, this EMA tracks {len(self._averages)}")
        averages = [as_tensor(a, f"average {i}", written=False) if is_array(a) else a for i, a in enumerate(averages)]
        for i, (mine, theirs) in enumerate(zip(self._averages, averages)):
            if not isinstance(theirs, torch.Tensor) or mine.shape != theirs.shape:
                raise ValueError(f"average {i} of shape {tuple(getattr(theirs, 'shape', ()))} does not fit "
                                 f"{tuple(mine.shape)}")
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid decay value: {decay} (must be in [0, 1), or None for the exact mean)")
        if int(num_updates) != num_updates or num_updates < 0:
            raise ValueError(f"Invalid num_updates: {num_updates} (a count, >= 0)")
        for mine, theirs in zip(self._averages, averages):
            mine.copy_(like_dtensor(theirs, mine))
        self.decay = decay
        self.num_updates = int(num_updates)
