"""Host side of batch normalization: input checks, the (R, C, S) view, and the autograd Function
whose forward and closed-form backward are the launchers of ``gpuopt.kernels.batch_norm``."""

from __future__ import annotations

import functools
import math

import torch

from ._runtime import ASSUMED_SM_COUNT, check_kernel_device, use_gpu_config
from .kernels import batch_norm as kernels

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@functools.lru_cache(maxsize=64)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_of(x: torch.Tensor, R: int, C: int, S: int, channels_last: bool) -> kernels.Grid:
    """The launch grid of the (R, C, S) view of ``x`` on its device (cached per shape)."""
    device = x.device
    if device.type == "cuda":
        return kernels.make_grid(R, C, S, channels_last, x.element_size(), True,
                                 _sm_count(device.index if device.index is not None else torch.cuda.current_device()))
    return kernels.make_grid(R, C, S, channels_last, x.element_size(), use_gpu_config(device), ASSUMED_SM_COUNT)


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
    """``t`` (a gradient) in the memory layout of ``like``, copied only when it differs."""
    dense = _channels_last_dense(t) if channels_last else t.is_contiguous()
    return t if dense and not misaligned(t) else torch.empty_like(like).copy_(t)


# ----------------------------------------------------------------------------- checks ---------


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          num_batches_tracked, eps):
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
    if training:
        size = input.size()
        values_per_channel = size[0] * math.prod(size[2:])
        if values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if running_mean is not None and momentum is None:
            if num_batches_tracked is None:
                raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked, "
                                 "the count of batches seen including this one")
    elif running_mean is None:
        raise ValueError("batch_norm: running_mean and running_var must be given in evaluation mode "
                         "(training=False)")


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward. Arguments are checked by
    :func:`gpuopt.functional.batch_norm`, which is the way to call this."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                eps_inside_sqrt):
        x, R, C, S, channels_last = view_of(input)
        g = grid_of(x, R, C, S, channels_last)
        if training:  # the backward reads the batch's statistics
            y, statistics = kernels.forward_training(x, g, weight, bias, running_mean, running_var,
                                                     num_batches_tracked, momentum, eps, eps_inside_sqrt)
            ctx.save_for_backward(x, weight, statistics)
        else:  # the backward reads the running statistics (constants)
            y = kernels.forward_eval(x, g, weight, bias, running_mean, running_var, eps, eps_inside_sqrt)
            ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.grid, ctx.training, ctx.eps, ctx.eps_inside_sqrt = g, training, eps, eps_inside_sqrt
        ctx.bias_dtype = None if bias is None else bias.dtype
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
    if ctx.training:
        x, weight, statistics = ctx.saved_tensors
        running_mean = running_var = None
    else:
        x, weight, running_mean, running_var = ctx.saved_tensors
        statistics = None
    g = ctx.grid
    dy = same_layout(grad_output, x, g.channels_last)
    dx, grad_weight, grad_bias = kernels.backward(
        x, dy, g, weight, statistics, running_mean, running_var, ctx.eps, ctx.eps_inside_sqrt,
        need_input=ctx.needs_input_grad[0], need_weight=weight is not None and ctx.needs_input_grad[1],
        need_bias=ctx.bias_dtype is not None and ctx.needs_input_grad[2], bias_dtype=ctx.bias_dtype)
    return dx, grad_weight, grad_bias, None, None, None, None, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, eps_inside_sqrt=True, num_batches_tracked=None):
    """See :func:`gpuopt.functional.batch_norm`."""
    if torch.compiler.is_compiling():
        return _batch_norm_eagerly(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                   eps_inside_sqrt=eps_inside_sqrt, num_batches_tracked=num_batches_tracked)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       eps_inside_sqrt=eps_inside_sqrt, num_batches_tracked=num_batches_tracked)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, *, eps_inside_sqrt,
                num_batches_tracked):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, num_batches_tracked,
                          eps)
    if input.numel() == 0:
        # As PyTorch: no statistics, running stats untouched, and an output that keeps the
        # gradient chain to weight and bias.
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out
    # Per-channel tensors in another layout are read from contiguous copies; running stats
    # updated in such a copy are written back to the caller's tensors.
    stats = (running_mean, running_var)
    running_mean, running_var = per_channel(running_mean), per_channel(running_var)
    out = BatchNormFunction.apply(input, per_channel(weight), per_channel(bias), running_mean, running_var,
                                  num_batches_tracked, bool(training), momentum, float(eps), bool(eps_inside_sqrt))
    if training:
        for theirs, ours in zip(stats, (running_mean, running_var)):
            if ours is not theirs:
                theirs.copy_(ours)
    return out


# Inside torch.compile this runs eagerly (a graph break), launching gpuopt's own kernels: Dynamo
# would otherwise trace into the launch code (and, under the interpreter, into NumPy). Outside,
# the check costs nothing, where the disabling wrapper cost a few µs per call.
_batch_norm_eagerly = torch.compiler.disable(_batch_norm)
_backward_eagerly = torch.compiler.disable(_backward)
