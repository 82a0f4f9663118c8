"""Drop-in batch-norm modules: ``torch.nn.BatchNorm1d/2d/3d`` with gpuopt's kernels.

Each class subclasses its torch counterpart and overrides only ``forward``: constructor
arguments, parameters, buffers, ``state_dict`` keys, ``train()``/``eval()`` and
``momentum=None`` (cumulative average) behave exactly as in torch. One extra keyword,
``eps_inside_sqrt`` (default True, PyTorch's normalization), selects the seed's ``(Z-μ)/(σ+ε)``
when False.
"""

from __future__ import annotations

import torch

from ._batch_norm import batch_norm_planned, sync_batch_norm
from ._reuse import ModulePlan


class _GpuoptBatchNorm:
    """The shared ``forward``: torch's ``_BatchNorm.forward`` calling gpuopt's batch_norm. The
    cumulative average's factor 1/t is read on the device from ``num_batches_tracked`` rather
    than by ``float(num_batches_tracked)``, a host sync torch makes every training step."""

    def __init__(self, *args, eps_inside_sqrt: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps_inside_sqrt = bool(eps_inside_sqrt)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        options = (self.training, self.track_running_stats, self.momentum, self.eps, self.eps_inside_sqrt)
        # (read from torch's dicts: each attribute read would go through Module.__getattr__)
        parameters, buffers = self._parameters, self._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        counter = buffers["num_batches_tracked"]
        # The last call's plan, while it fits: no checks, no copies (inside torch.compile, the
        # traced custom operator instead; the plan is neither read nor made there).
        plan = None if torch.compiler.is_compiling() else self.__dict__.get("_gpuopt_plan")
        if plan is not None:
            out = plan.run(options, input, weight, bias, running_mean, running_var, counter)
            if out is not None:
                return out
        self._check_input_dim(input)
        tracking = self.training and self.track_running_stats
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        pass_buffers = not self.training or self.track_running_stats
        out, passes = batch_norm_planned(input, running_mean if pass_buffers else None,
                                        running_var if pass_buffers else None, weight, bias, use_batch_stats,
                                        self.momentum, self.eps, self.eps_inside_sqrt, counter if tracking else None,
                                        count=True)  # (counted once the arguments are checked)
        if passes is not None:
            tensors = (input, weight, bias, running_mean, running_var, counter)
            self.__dict__["_gpuopt_plan"] = ModulePlan(options, tensors, passes, pass_buffers)
        elif plan is not None:
            self.__dict__["_gpuopt_plan"] = None
        return out

    def __getstate__(self):
        # The plan is a cache of the last call (addresses, kept launchers), not the module's
        # state: a pickled or deep-copied module makes its own on its first call.
        state = self.__dict__.copy()
        state.pop("_gpuopt_plan", None)
        return state

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.eps_inside_sqrt else text + ", eps_inside_sqrt=False"


class SyncBatchNorm(_GpuoptBatchNorm, torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` on gpuopt's kernels: in training, the statistics of the whole
    process group's batch (``process_group``, default the world), with one all-gather per forward
    and one all-reduce per backward and no host synchronisation (torch's waits on the host for
    the gathered counts, and reads ``num_batches_tracked`` with ``.item()`` for momentum=None).
    Same constructor, parameters, buffers and state_dict as torch's; unequal batch sizes across
    ranks and a rank with an empty batch work as in torch. Outside training, or in a group of one,
    it is gpuopt's plain batch norm. Unlike torch's, it runs on the CPU too (Triton's interpreter,
    a gloo group). It is not a subclass of ``torch.nn.SyncBatchNorm``: DDP refuses a CPU module
    holding one, and gpuopt's runs there."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 eps_inside_sqrt: bool = True, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         eps_inside_sqrt=eps_inside_sqrt, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            world_size = torch.distributed.get_world_size(group)
            if world_size > 1:
                tracking = self.track_running_stats
                if tracking:
                    self.num_batches_tracked.add_(1)
                return sync_batch_norm(input, self.running_mean if tracking else None,
                                       self.running_var if tracking else None, self.weight, self.bias,
                                       self.momentum, self.eps, self.eps_inside_sqrt,
                                       self.num_batches_tracked if tracking else None, group, world_size)
        return super().forward(input)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None, *,
                               eps_inside_sqrt: bool | None = None) -> torch.nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every batch-norm layer of ``module``
        (torch's or gpuopt's) replaced by a ``gpuopt.nn.SyncBatchNorm`` sharing its parameters and
        buffers. ``eps_inside_sqrt``: kept from a gpuopt passes, True (torch's) otherwise, unless given."""
        output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            keep = getattr(module, "eps_inside_sqrt", True)
            output = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         process_group, eps_inside_sqrt=keep if eps_inside_sqrt is None else eps_inside_sqrt)
            _take_over(output, module)
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group, eps_inside_sqrt=eps_inside_sqrt))
        del module
        return output


def _take_over(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """``new`` (a batch norm replacing ``old``) takes ``old``'s very Parameter and buffer objects,
    mode and qconfig: an optimizer built on the old model, and anything else holding them, keeps
    working."""
    new.weight, new.bias = old.weight, old.bias
    new.running_mean, new.running_var = old.running_mean, old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.training = old.training
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig


class BatchNorm1d(_GpuoptBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` for (N, C) or (N, C, L) input, on gpuopt's kernels."""


class BatchNorm2d(_GpuoptBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` for (N, C, H, W) input (contiguous or channels_last), on gpuopt's kernels."""


class BatchNorm3d(_GpuoptBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` for (N, C, D, H, W) input (contiguous or channels_last_3d), on gpuopt's kernels."""


_REPLACEMENTS = ((torch.nn.BatchNorm1d, BatchNorm1d), (torch.nn.BatchNorm2d, BatchNorm2d),
                 (torch.nn.BatchNorm3d, BatchNorm3d))


def _replacement(module: torch.nn.Module, eps_inside_sqrt: bool) -> torch.nn.Module:
    if isinstance(module, _GpuoptBatchNorm):
        return module
    for torch_cls, gpuopt_cls in _REPLACEMENTS:
        if type(module) is torch_cls:
            new = gpuopt_cls(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, eps_inside_sqrt=eps_inside_sqrt)
            _take_over(new, module)
            # Hooks registered on the old module (forward, backward, state_dict, ...) keep firing,
            # and their handles keep removing them: the same hook dictionaries, shared.
            for name, value in vars(module).items():
                if "hook" in name:  # _forward_hooks, _forward_pre_hooks, _state_dict_hooks, ...
                    setattr(new, name, value)
            return new
    return module


def convert_batchnorm(module: torch.nn.Module, *, eps_inside_sqrt: bool = True) -> torch.nn.Module:
    """Return ``module`` with every ``torch.nn.BatchNorm1d/2d/3d`` inside replaced by gpuopt's,
    sharing its parameters and buffers (like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).
    Subclasses of the torch modules (which may change ``forward``) and other modules are kept."""
    output = _replacement(module, eps_inside_sqrt)
    for name, child in module.named_children():
        output.add_module(name, convert_batchnorm(child, eps_inside_sqrt=eps_inside_sqrt))
    return output


__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert_batchnorm"]
