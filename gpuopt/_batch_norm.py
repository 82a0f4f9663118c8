"""Host side of batch normalization: input checks, the (R, C, S) view, and the autograd Function
whose forward and closed-form backward call the launches of ``gpuopt._batch_norm_launch``."""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch

from . import _batch_norm_launch as launches
from ._launch import check_kernel_device
from .kernels import batch_norm as kernels

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- layout ---------


def _channels_last_dense(t: torch.Tensor) -> bool:
    """Channel the fastest-moving index: NHWC / NDHWC memory, or a contiguous (N, C) matrix."""
    return t.movedim(1, -1).is_contiguous()


def view_of(x: torch.Tensor):
    """``(tensor, R, C, S, channels_last)``: the input as the kernels read it. Contiguous input is
    (N, C, S) channels-first; channels-last memory (or S = 1) is (N·S, C); any other strides are
    copied to contiguous first."""
    N, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    x = aligned(x)
    if S == 1 or (not x.is_contiguous() and _channels_last_dense(x)):
        if not _channels_last_dense(x):
            x = x.contiguous()
        return x, N * S, C, 1, True
    return x.contiguous(), N, C, S, False


def passes_of(input: torch.Tensor, weight, bias, running_mean, training, momentum, eps, eps_inside_sqrt, *,
             count: bool = False) -> tuple[torch.Tensor, launches.Passes]:
    """``(x, passes)``: the input as the kernels read it (``view_of``) and the ``launches.Passes`` of a
    call with these tensors and options (``count``: the statistics pass counts the batch)."""
    x, R, C, S, channels_last = view_of(input)
    return x, launches.Passes(launches.grid_of(x, R, C, S, channels_last), bool(training), momentum, float(eps),
                            bool(eps_inside_sqrt), weight is not None, bias is not None, running_mean is not None,
                            count)


def misaligned(t: torch.Tensor) -> bool:
    """The address is not a multiple of the element size (e.g. ``torch.frombuffer(..., offset=2)``):
    the kernels address whole elements, so such a tensor is read from a copy."""
    return t.data_ptr() % t.element_size() != 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is misaligned."""
    return t.clone() if misaligned(t) else t


def per_channel(t):
    """A weight, bias or running statistic as the kernels read it: C contiguous, aligned elements
    (a strided view such as ``torch.zeros(6)[::2]`` or an ``expand()``ed weight is copied)."""
    if t is None or (t.is_contiguous() and not misaligned(t)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def same_layout(t: torch.Tensor, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` (a gradient, of ``like``'s shape) in the memory layout of ``like`` (dense), copied only
    when it differs."""
    if t.stride() == like.stride():  # (the usual case, and the cheapest test)
        return aligned(t)
    dense = _channels_last_dense(t) if channels_last else t.is_contiguous()
    return t if dense and not misaligned(t) else torch.empty_like(like).copy_(t)


# ----------------------------------------------------------------------------- checks ---------


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          num_batches_tracked, eps, *, synchronised=False):
    """Every check that PyTorch makes (and a few it leaves to a crash), before any kernel runs."""
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2 and not (input.dim() == 1 and input.numel() == 0):  # torch returns (0,) for (0,)
        raise ValueError(f"batch_norm: expected an input of shape (N, C, ...) with at least 2 dimensions, "
                         f"got {input.dim()}-D input of shape {tuple(input.shape)}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"batch_norm: input must be float32, bfloat16, float16 or float64, got {input.dtype}")
    check_kernel_device(input, "batch_norm's input")
    C = input.shape[1] if input.dim() > 1 else 0
    allowed = {input.dtype, torch.float32}
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"batch_norm: {name} must be a tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != C:
            raise ValueError(f"batch_norm: {name} should contain {C} elements (the input's channels, dim 1 of "
                             f"shape {tuple(input.shape)}), not shape {tuple(t.shape)}")
        if t.dtype not in allowed:
            raise TypeError(f"batch_norm: {name} must be {input.dtype} (the input's dtype) or float32, "
                            f"got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"batch_norm: {name} is on {t.device} but the input is on {input.device}")
        if name.startswith("running") and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"batch_norm is not differentiable with respect to argument '{name}'. This input "
                               "cannot have requires_grad True.")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither")
    if training and num_batches_tracked is not None:
        check_counter(num_batches_tracked, input)
    if training:
        size = input.size()
        values_per_channel = size[0] * math.prod(size[2:])
        if values_per_channel == 1 and not synchronised:  # (SyncBatchNorm: the group's count is what counts)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if running_mean is not None and momentum is None:
            if num_batches_tracked is None:
                raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked, "
                                 "the count of batches seen including this one")
    elif running_mean is None:
        raise ValueError("batch_norm: running_mean and running_var must be given in evaluation mode "
                         "(training=False)")


def check_counter(num_batches_tracked, input: torch.Tensor) -> None:
    """``num_batches_tracked`` is read on the device (momentum=None) and counted there (a
    module's forward): one real number, element-aligned, on the input's device."""
    t = num_batches_tracked
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"batch_norm: num_batches_tracked must be a tensor or None, got {type(t).__name__}")
    if t.numel() != 1 or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"batch_norm: num_batches_tracked must hold one integer or floating-point number, got "
                         f"shape {tuple(t.shape)} {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"batch_norm: num_batches_tracked is on {t.device} but the input is on {input.device}")
    if not torch.compiler.is_compiling() and misaligned(t):  # (data_ptr() would break a compiled graph)
        raise ValueError("batch_norm: num_batches_tracked's address is not a multiple of its element size")
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("batch_norm is not differentiable with respect to num_batches_tracked, which it updates "
                           "in place; it cannot have requires_grad True.")


class BatchNormCall(NamedTuple):
    """What a ``BatchNormFunction`` call takes besides its differentiable tensors: ``x`` is
    ``input`` as the kernels read it (``view_of``: ``input`` itself, or a copy made outside the
    graph); the running statistics and counter (None where absent); the call's ``Passes``."""

    x: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    passes: launches.Passes


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward: ``apply(input, weight, bias, call)`` with a
    ``BatchNormCall``, whose tensors are not differentiable (checked) and which autograd does
    not look into: each tensor argument of ``apply`` costs its bookkeeping. Arguments are
    checked by :func:`gpuopt.functional.batch_norm`, which is the way to call this."""

    @staticmethod
    def forward(ctx, input, weight, bias, call: BatchNormCall):
        x, passes = call.x, call.passes
        if passes.training:  # the backward reads the batch's statistics
            y, statistics = launches.forward_training(x, passes, weight, bias, call.running_mean, call.running_var,
                                                      call.num_batches_tracked)
            ctx.save_for_backward(x, weight)
        else:  # the backward reads the running statistics (constants)
            y = launches.forward_eval(x, passes, weight, bias, call.running_mean, call.running_var)
            ctx.save_for_backward(x, weight, call.running_mean, call.running_var)
            statistics = None
        # The statistics are this call's own scratch, which nothing else holds or changes: kept on
        # ctx rather than saved (a saved tensor's version check and hooks cost more).
        ctx.passes, ctx.statistics, ctx.bias_dtype = passes, statistics, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        # A compiled function that calls loss.backward() runs the backward eagerly, but Dynamo
        # still evaluates this frame: break the graph here instead of tracing the launches.
        if torch.compiler.is_compiling():
            return _backward_eagerly(ctx, grad_output)
        return _backward(ctx, grad_output)


def _backward(ctx, grad_output):
    """The backward of ``BatchNormFunction`` (the closed form, as kernels)."""
    if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient was asked for
        raise RuntimeError("gpuopt's batch_norm has a first-order backward only (its closed form runs as "
                           "kernels); for double backward (create_graph=True, gradient penalties) use "
                           "torch.nn.functional.batch_norm")
    passes = ctx.passes
    if passes.training:
        x, weight = ctx.saved_tensors
        running_mean = running_var = None
    else:
        x, weight, running_mean, running_var = ctx.saved_tensors
    dy = same_layout(grad_output, x, passes.grid.channels_last)
    needs = ctx.needs_input_grad
    dx, grad_weight, grad_bias = launches.backward(
        x, dy, passes, weight, ctx.statistics, running_mean, running_var, need_input=needs[0],
        need_weight=weight is not None and needs[1], need_bias=ctx.bias_dtype is not None and needs[2],
        bias_dtype=ctx.bias_dtype)
    return dx, grad_weight, grad_bias, None


# Inside a compiled region the backward's launches are not traced: Dynamo runs it eagerly.
_backward_eagerly = torch.compiler.disable(_backward)


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single (absent in 2.11)
_all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the batches of every rank of a process group (``gpuopt.nn.SyncBatchNorm``
    in training). Forward: each rank's split reduction folded to a per-channel summary (count, μ,
    M2), one all-gather of the summaries, and their fold on the device with Chan's formula into
    the group's statistics (and running statistics). Backward: each rank's Σ dẐ and Σ dẐ(Z-μ),
    one all-reduce, then the closed form with the group's count. ∂L/∂G and ∂L/∂B are this rank's,
    as torch's SyncBatchNorm returns them (DDP averages them). No host synchronisation: counts
    stay on the device. A rank with an empty batch takes part with a zero count."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                eps_inside_sqrt, process_group, world_size):
        C = input.shape[1]
        counts = []

        def exchange(summary):  # [3, C] → every rank's, [3, ranks, C]
            gathered = summary.new_empty(world_size * 3, C)  # ranks' [3, C] stacked on dim 0, as NCCL and gloo fill it
            _all_gather(gathered, summary.contiguous(), group=process_group)
            gathered = gathered.view(world_size, 3, C)
            counts.append(gathered[:, int(kernels.COUNT.value), 0].sum())
            return gathered.transpose(0, 1).contiguous()

        empty = input.numel() == 0
        if empty:
            x = input
            passes = launches.Passes(launches.grid_of(input, 1, C, 1, True), True, momentum, eps, eps_inside_sqrt,  # (the combine's
                                  weight is not None, bias is not None, running_mean is not None)  # settings, C channels)
            acc_dtype = passes.grid.acc_dtype
            statistics = torch.zeros(kernels.N_STATISTICS * C, dtype=acc_dtype, device=input.device)
            summaries = exchange(torch.zeros(3, C, dtype=acc_dtype, device=input.device))
            launches.fold_statistics(passes, summaries, world_size, statistics, running_mean, running_var,
                                    num_batches_tracked)
            y = input.clone()
        else:
            x, passes = passes_of(input, weight, bias, running_mean, True, momentum, eps, eps_inside_sqrt)
            y, statistics = launches.forward_training(x, passes, weight, bias, running_mean, running_var,
                                                     num_batches_tracked, exchange=exchange)
        ctx.save_for_backward(x, weight, statistics, counts[0])
        ctx.passes, ctx.empty = passes, empty
        ctx.process_group, ctx.bias_dtype = process_group, None if bias is None else bias.dtype
        return y

    @staticmethod
    @torch.compiler.disable
    def backward(ctx, grad_output):
        x, weight, statistics, count = ctx.saved_tensors
        passes, C = ctx.passes, x.shape[1]
        g = passes.grid
        need_input = ctx.needs_input_grad[0]
        need_weight = weight is not None and ctx.needs_input_grad[1]
        need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        if ctx.empty:
            sums = torch.zeros(2 * C, dtype=g.acc_dtype, device=x.device)
            grad_weight = torch.zeros_like(weight) if need_weight else None
            grad_bias = torch.zeros(C, dtype=ctx.bias_dtype, device=x.device) if need_bias else None
        else:
            dy = same_layout(grad_output, x, g.channels_last)
            sums, grad_weight, grad_bias = launches.backward_sums(
                x, dy, passes, weight, statistics, None, None, need_weight=need_weight, need_bias=need_bias,
                bias_dtype=ctx.bias_dtype)
        dx = None
        if need_input:
            group_sums = sums[:2 * C]
            torch.distributed.all_reduce(group_sums, group=ctx.process_group)
            if ctx.empty:
                dx = torch.empty_like(grad_output)
            else:
                # The kernel divides the sums by this rank's count (R·S); the group's sums are divided
                # by the group's count.
                group_sums.mul_((g.R * g.S) / count)
                dx = launches.backward_input(x, dy, passes, weight, statistics, None, sums)
        return dx, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, eps_inside_sqrt,
                    num_batches_tracked, process_group, world_size):
    """Training batch norm synchronised over ``process_group`` (``world_size`` ranks): see
    ``SyncBatchNormFunction``. Checked as ``batch_norm``."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, num_batches_tracked, eps,
                          synchronised=True)
    stats = (running_mean, running_var)
    running_mean, running_var = per_channel(running_mean), per_channel(running_var)
    out = SyncBatchNormFunction.apply(input, per_channel(weight), per_channel(bias), running_mean, running_var,
                                      num_batches_tracked, momentum, float(eps), bool(eps_inside_sqrt), process_group,
                                      world_size)
    write_back(stats, (running_mean, running_var))
    return out


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, eps_inside_sqrt=True, num_batches_tracked=None):
    """See :func:`gpuopt.functional.batch_norm`."""
    return batch_norm_planned(input, running_mean, running_var, weight, bias, training, momentum, eps,
                              eps_inside_sqrt, num_batches_tracked)[0]


def batch_norm_planned(input, running_mean, running_var, weight, bias, training, momentum, eps, eps_inside_sqrt,
                       num_batches_tracked, *, count=False) -> tuple[torch.Tensor, launches.Passes | None]:
    """``batch_norm``, and the ``Passes`` it ran: ``(output, passes)``, ``passes`` None unless
    ``BatchNormFunction`` read every tensor as given (no copy to the kernels' layout, a non-empty
    input, eager), so that a module may call it again with that layer (``ModulePlan``).
    ``count``: add this batch to ``num_batches_tracked`` first (a module's forward in training),
    once the arguments passed their checks: in the statistics kernel (``Passes.count``) when it
    runs, else here."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, num_batches_tracked,
                          eps)
    count = count and num_batches_tracked is not None
    compiling = torch.compiler.is_compiling()
    if count and (input.numel() == 0 or compiling or not training):
        num_batches_tracked.add_(1)
        count = False
    if input.numel() == 0:
        # As PyTorch: no statistics, running stats untouched, and an output that keeps the
        # gradient chain to weight and bias.
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out, None
    if compiling:  # one node of the compiled graph (see _batch_norm_op)
        out, _, new_mean, new_var = torch.ops.gpuopt.batch_norm(
            input, weight, bias, running_mean, running_var, num_batches_tracked, bool(training), momentum,
            float(eps), bool(eps_inside_sqrt))
        if training and running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return out, None
    with torch.no_grad():  # a copy of the input for the kernels is no part of the graph
        x, passes = passes_of(input, weight, bias, running_mean, training, momentum, eps, eps_inside_sqrt, count=count)
    # Per-channel tensors in another layout are read from contiguous copies; running stats
    # updated in such a copy are written back to the caller's tensors.
    given = (weight, bias, running_mean, running_var)
    weight, bias, running_mean, running_var = read = tuple(map(per_channel, given))
    out = BatchNormFunction.apply(input, weight, bias, BatchNormCall(x, running_mean, running_var, num_batches_tracked,
                                                                     passes))
    if training:
        write_back(given[2:], read[2:])
    as_given = x is input and all(map(operator.is_, read, given))
    return out, passes if as_given else None


@torch.no_grad()
def batch_norm_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, eps_inside_sqrt,
                       num_batches_tracked):
    """See :func:`gpuopt.functional.batch_norm_forward`."""
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, num_batches_tracked,
                          eps)
    C = input.shape[1] if input.dim() > 1 else 0
    if input.numel() == 0:
        return input.clone(), (input.new_zeros(kernels.N_STATISTICS, C, dtype=_statistics_dtype(input))
                                if training else None)
    x, passes = passes_of(input, weight, bias, running_mean, training, momentum, eps, eps_inside_sqrt)
    stats = (running_mean, running_var)
    running_mean, running_var = per_channel(running_mean), per_channel(running_var)
    if not training:
        return launches.forward_eval(x, passes, per_channel(weight), per_channel(bias), running_mean, running_var), None
    y, statistics = launches.forward_training(x, passes, per_channel(weight), per_channel(bias), running_mean,
                                             running_var, num_batches_tracked)
    write_back(stats, (running_mean, running_var))
    return y, statistics[:kernels.N_STATISTICS * C].view(kernels.N_STATISTICS, C)  # (then the partials)


@torch.no_grad()
def batch_norm_backward(grad_output, input, weight, statistics, running_mean, running_var, eps, eps_inside_sqrt,
                        output_mask):
    """See :func:`gpuopt.functional.batch_norm_backward`."""
    if grad_output.shape != input.shape:
        raise ValueError(f"batch_norm_backward: grad_output has shape {tuple(grad_output.shape)}, the input "
                         f"{tuple(input.shape)}")
    training = statistics is not None
    check_batch_norm_args(input, running_mean, running_var, weight, None, training, 0.1, None, eps,
                          synchronised=True)
    C = input.shape[1]
    if training and (statistics.numel() != kernels.N_STATISTICS * C or statistics.dtype != _statistics_dtype(input)):
        raise ValueError(f"batch_norm_backward: statistics must be batch_norm_forward's ({kernels.N_STATISTICS}, {C}) "
                         f"{_statistics_dtype(input)} values for this input, got {tuple(statistics.shape)} "
                         f"{statistics.dtype}")
    need_input, need_weight, need_bias = output_mask
    need_weight = need_weight and weight is not None
    parameter_dtype = weight.dtype if weight is not None else torch.float32
    if input.numel() == 0:
        return (torch.empty_like(grad_output) if need_input else None,
                torch.zeros_like(weight) if need_weight else None,
                torch.zeros(C, dtype=parameter_dtype, device=input.device) if need_bias else None)
    x, passes = passes_of(input, weight, None, running_mean, training, None, eps, eps_inside_sqrt)
    return launches.backward(x, same_layout(grad_output, x, passes.grid.channels_last), passes, per_channel(weight),
                            statistics.reshape(-1) if training else None,
                            None if training else per_channel(running_mean),
                            None if training else per_channel(running_var),
                            need_input=need_input, need_weight=need_weight, need_bias=need_bias,
                            bias_dtype=parameter_dtype)


def write_back(theirs, ours):
    """Running statistics updated in contiguous copies (``per_channel``) go back to the caller's."""
    for their, our in zip(theirs, ours):
        if our is not their:
            their.copy_(our)


# ---------------------------------------------------------------------- torch.compile ---------
# Inside torch.compile, batch norm is two custom operators with fake (shape-only) versions, so
# Dynamo and AOTAutograd trace a model through it with no graph break: the forward
# (``gpuopt::batch_norm``) and its closed-form backward (``gpuopt::batch_norm_backward``),
# registered as its autograd formula. An operator with an autograd formula must be functional, so
# the forward returns the updated running statistics (as torch's
# ``_native_batch_norm_legit_functional``) and the graph copies them into the buffers. At run time
# the operators call the same launchers as the eager path, which does not go through them (the
# dispatcher's cost per call would double an eager layer's host cost: bench/NOTES.md).

Tensor = torch.Tensor


def _layout_like(input: Tensor) -> Tensor:
    """An empty tensor in the memory layout the kernels give ``input``'s outputs (``view_of``):
    a channels-last-dense input keeps its strides, anything else is read from (and written as)
    contiguous memory."""
    if _channels_last_dense(input):
        return torch.empty_like(input)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


def _statistics_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.custom_op("gpuopt::batch_norm", mutates_args=())
def _batch_norm_op(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                   running_var: Tensor | None, num_batches_tracked: Tensor | None, training: bool,
                   momentum: float | None, eps: float, eps_inside_sqrt: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, statistics, new running mean, new running var)``: the statistics are the batch's μ,
    1/s, σ, shift in training; what training does not make is empty. Arguments checked by
    ``batch_norm``."""
    x, passes = passes_of(input, weight, bias, running_mean, training, momentum, eps, eps_inside_sqrt)
    weight, bias = per_channel(weight), per_channel(bias)
    if not training:
        y = launches.forward_eval(x, passes, weight, bias, per_channel(running_mean), per_channel(running_var))
        return y, x.new_empty(0, dtype=passes.grid.acc_dtype), x.new_empty(0), x.new_empty(0)  # (outputs may not alias)
    new_mean = None if running_mean is None else running_mean.clone(memory_format=torch.contiguous_format)
    new_var = None if running_var is None else running_var.clone(memory_format=torch.contiguous_format)
    y, statistics = launches.forward_training(x, passes, weight, bias, new_mean, new_var, num_batches_tracked)
    statistics = statistics[:kernels.N_STATISTICS * passes.grid.C]  # (then the partials)
    return y, statistics, x.new_empty(0) if new_mean is None else new_mean, x.new_empty(0) if new_var is None else new_var


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps, eps_inside_sqrt):
    if not training:
        return _layout_like(input), input.new_empty(0, dtype=_statistics_dtype(input)), input.new_empty(0), \
            input.new_empty(0)
    statistics = input.new_empty(kernels.N_STATISTICS * input.shape[1], dtype=_statistics_dtype(input))
    new_stats = [input.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (running_mean, running_var)]
    return _layout_like(input), statistics, *new_stats


@torch.library.custom_op("gpuopt::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(grad_output: Tensor, input: Tensor, weight: Tensor | None, statistics: Tensor,
                            running_mean: Tensor | None, running_var: Tensor | None, eps: float,
                            eps_inside_sqrt: bool, need_input: bool, need_weight: bool,
                            bias_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂Z, ∂L/∂G, ∂L/∂B)``, each empty when not wanted (``bias_dtype`` None: no ∂L/∂B).
    ``statistics`` empty: the forward ran in evaluation mode."""
    training = statistics.numel() > 0
    x, passes = passes_of(input, weight, None, running_mean, training, None, eps, eps_inside_sqrt)
    dx, grad_weight, grad_bias = launches.backward(
        x, same_layout(grad_output, x, passes.grid.channels_last), passes, per_channel(weight),
        statistics if training else None, None if training else per_channel(running_mean),
        None if training else per_channel(running_var), need_input=need_input, need_weight=need_weight, need_bias=bias_dtype is not None,
        bias_dtype=bias_dtype)
    return tuple(x.new_empty(0) if t is None else t for t in (dx, grad_weight, grad_bias))  # (may not alias)


@_batch_norm_backward_op.register_fake
def _(grad_output, input, weight, statistics, running_mean, running_var, eps, eps_inside_sqrt, need_input,
      need_weight, bias_dtype):
    return (_layout_like(input) if need_input else input.new_empty(0),
            torch.empty_like(weight) if need_weight else input.new_empty(0),
            input.new_empty(input.shape[1], dtype=bias_dtype) if bias_dtype is not None else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, _, training, _, eps, eps_inside_sqrt = inputs
    if training:
        ctx.save_for_backward(input, weight, output[1], None, None)
    else:  # the running statistics normalized: constants of the backward
        ctx.save_for_backward(input, weight, output[1], running_mean, running_var)
    ctx.eps, ctx.eps_inside_sqrt = eps, eps_inside_sqrt
    ctx.bias_dtype = None if bias is None else bias.dtype


def _batch_norm_op_backward(ctx, grad_output, *_):
    input, weight, statistics, running_mean, running_var = ctx.saved_tensors
    need_weight = weight is not None and ctx.needs_input_grad[1]
    need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, grad_weight, grad_bias = torch.ops.gpuopt.batch_norm_backward(
        grad_output, input, weight, statistics, running_mean, running_var, ctx.eps, ctx.eps_inside_sqrt,
        ctx.needs_input_grad[0], need_weight, ctx.bias_dtype if need_bias else None)
    return (dx if ctx.needs_input_grad[0] else None, grad_weight if need_weight else None,
            grad_bias if need_bias else None, None, None, None, None, None, None, None)


torch.library.register_autograd("gpuopt::batch_norm", _batch_norm_op_backward, setup_context=_setup_context)
