"""Host side of batch normalization: input checks, the (R, C, S) view, launch grids, and the
autograd Function whose backward runs the closed-form kernels of ``gpuopt.kernels.batch_norm``."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton.language as tl

from . import _launch
from ._runtime import ASSUMED_SM_COUNT, check_kernel_device, use_gpu_config
from .kernels import batch_norm as kernels

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A tile of the big passes holds this many elements (2048 fp32 = 8 per thread at 8 warps). The
# interpreter runs tiles one after another in NumPy at a cost per tile, not per element: small
# test inputs (up to 1024 elements) get 64-element tiles (many tiles and splits, so every path
# runs), larger ones a few tiles of up to 16384, so that a small model trains in seconds per epoch.
_GPU_TILE, _GPU_WARPS, _GPU_PROGRAMS_PER_SM = 2048, 8, 4
_INTERPRETER_TILE, _INTERPRETER_MAX_TILE, _INTERPRETER_PROGRAMS = 64, 16384, 3
_COMBINE_BLOCK_C = 64


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _column_block(n_cols: int, largest: int) -> int:
    """The power-of-2 tile width that wastes the fewest lanes on rows of ``n_cols`` values (the
    widest among near-ties: fewer iterations)."""
    candidates = [b for b in (2 ** i for i in range(11)) if min(_next_power_of_2(n_cols), 32) <= b <= largest]
    utilisation = {b: n_cols / (_cdiv(n_cols, b) * b) for b in candidates}
    best = max(utilisation.values())
    return max(b for b, u in utilisation.items() if u >= best - 0.02)


@dataclass(frozen=True)
class Grid:
    """How the passes over one (R, C, S) view are split into programs (see kernels/batch_norm.py)."""

    R: int
    C: int
    S: int
    channels_last: bool
    block_r: int
    block_k: int
    vec: int
    channel_blocks: int
    rows_per_split: int
    cols_per_split: int
    col_splits: int
    n_splits: int
    num_warps: int
    combine_block_splits: int  # the combine kernels fold this many splits at a time
    combine_warps: int
    float64: bool  # accumulate in float64 (float64 input), else float32

    # What every launch over this view passes, made once per view (the grid is cached): the host
    # cost of a layer is then the tensors it allocates and the launches themselves.

    @functools.cached_property
    def grid(self):
        return (self.channel_blocks, self.n_splits)

    @functools.cached_property
    def combine_grid(self):
        return (_cdiv(self.C, _COMBINE_BLOCK_C),)

    @functools.cached_property
    def acc_dtype(self):
        return torch.float64 if self.float64 else torch.float32

    @functools.cached_property
    def combine_constexprs(self):
        return dict(BLOCK_SPLITS=self.combine_block_splits, BLOCK_C=_COMBINE_BLOCK_C,
                    ACC=tl.float64 if self.float64 else tl.float32)

    @functools.cached_property
    def args(self):
        return (self.R, self.C, self.S, self.rows_per_split, self.cols_per_split, self.col_splits)

    @functools.cached_property
    def constexprs(self):
        return dict(CHANNELS_LAST=self.channels_last, BLOCK_R=self.block_r, BLOCK_K=self.block_k, VEC=self.vec,
                    ACC=tl.float64 if self.float64 else tl.float32)


@functools.lru_cache(maxsize=256)
def make_grid(R: int, C: int, S: int, channels_last: bool, element_size: int, gpu_config: bool,
              sm_count: int) -> Grid:
    if gpu_config:
        # float64 tiles hold half the elements over half the warps: 8 values per thread as in
        # fp32 (the statistics kernel's per-lane Welford state spilled at 2048 fp64 values).
        tile = _GPU_TILE // 2 if element_size == 8 else _GPU_TILE
    elif R * C * S <= 1024:
        tile = _INTERPRETER_TILE
    else:
        tile = min(_INTERPRETER_MAX_TILE, _next_power_of_2(R * C * S // 4))
    target_programs = sm_count * _GPU_PROGRAMS_PER_SM if gpu_config else _INTERPRETER_PROGRAMS
    n_cols = C if channels_last else S
    if channels_last:
        # A warp reads 32 × 16 bytes: one 128-channel fp32 run (256 for 16-bit types) per row.
        block_k = min(_next_power_of_2(C), 512 // element_size if gpu_config else 64)
        channel_blocks = _cdiv(C, block_k)
    else:
        block_k = _column_block(S, min(tile, 1024))
        channel_blocks = C
    block_r = max(1, tile // block_k)
    # Spread each channel over enough splits to give every SM several programs: rows first, then
    # (channels-first, when a channel has few rows of many values) columns.
    wanted = max(1, _cdiv(target_programs, channel_blocks))
    row_tiles, col_tiles = _cdiv(R, block_r), (1 if channels_last else _cdiv(S, block_k))
    row_splits = min(row_tiles, wanted)
    col_splits = min(col_tiles, _cdiv(wanted, row_splits))
    rows_per_split = _cdiv(row_tiles, row_splits) * block_r
    cols_per_split = _cdiv(col_tiles, col_splits) * block_k
    row_splits = _cdiv(R, rows_per_split)
    # Channels-last columns are channel blocks (grid axis 0), never split.
    col_splits = 1 if channels_last else _cdiv(S, cols_per_split)
    # 16-byte accesses need every row start 16-byte aligned: VEC elements must divide the row
    # length (channels-first: S, which also aligns each channel's offset c·S; channels-last: C).
    vec = 16 // element_size
    while n_cols % vec:
        vec //= 2
    n_splits = row_splits * col_splits
    return Grid(R, C, S, channels_last, block_r, block_k, vec, channel_blocks, rows_per_split, cols_per_split,
                col_splits, n_splits, (_GPU_WARPS * tile // _GPU_TILE) if gpu_config else 1,
                min(_next_power_of_2(n_splits), 32 if gpu_config else 4), 4 if gpu_config else 1, element_size == 8)


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


# ----------------------------------------------------------------------------- passes ---------


def forward_train(x, g: Grid, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                  eps_inside_sqrt):
    """Statistics (split reduction + combine, running stats updated) then normalize: three launches.
    Returns (y, mean, invstd, std or None) with the statistics in the accumulation dtype."""
    acc, C, device = g.acc_dtype, g.C, x.device
    count, part_mean, part_m2 = (torch.empty((g.n_splits, C), dtype=acc, device=device) for _ in range(3))
    shift = torch.empty(C, dtype=acc, device=device)
    _launch.launch(kernels._stats_kernel, g.grid, (x, count, part_mean, part_m2, shift, *g.args), g.constexprs,
                   g.num_warps)

    mean = torch.empty(C, dtype=acc, device=device)
    invstd = torch.empty(C, dtype=acc, device=device)
    std = None if eps_inside_sqrt else torch.empty(C, dtype=acc, device=device)
    update = running_mean is not None
    cumulative = update and momentum is None
    _launch.launch(kernels._stats_combine_f64_kernel if g.float64 else kernels._stats_combine_kernel, g.combine_grid,
                   (count, part_mean, part_m2, shift, g.n_splits, C, mean, invstd, std,
                    running_mean, running_var, num_batches_tracked if cumulative else None,
                    0.0 if momentum is None else float(momentum), float(eps)),
                   dict(EPS_INSIDE_SQRT=eps_inside_sqrt, SAVE_STD=std is not None, UPDATE_RUNNING=update,
                        CUMULATIVE=cumulative, **g.combine_constexprs),
                   g.combine_warps)

    y = torch.empty_like(x)
    _launch.launch(kernels._normalize_f64_kernel if g.float64 else kernels._normalize_kernel, g.grid,
                   (x, y, mean, invstd, weight, bias, float(eps), *g.args),
                   dict(FROM_RUNNING_VAR=False, EPS_INSIDE_SQRT=eps_inside_sqrt, HAS_WEIGHT=weight is not None,
                        HAS_BIAS=bias is not None, **g.constexprs),
                   g.num_warps)
    return y, mean, invstd, std


def forward_eval(x, g: Grid, weight, bias, running_mean, running_var, eps, eps_inside_sqrt):
    """One elementwise launch from the running statistics."""
    y = torch.empty_like(x)
    _launch.launch(kernels._normalize_f64_kernel if g.float64 else kernels._normalize_kernel, g.grid,
                   (x, y, running_mean, running_var, weight, bias, float(eps), *g.args),
                   dict(FROM_RUNNING_VAR=True, EPS_INSIDE_SQRT=eps_inside_sqrt, HAS_WEIGHT=weight is not None,
                        HAS_BIAS=bias is not None, **g.constexprs),
                   g.num_warps)
    return y


def backward(x, dy, g: Grid, weight, mean, invstd, std, training, eps_inside_sqrt, need_input, need_weight,
             need_bias, bias_dtype=None):
    """Reduction (Σ dẐ, Σ dẐ(Z-μ)) + combine, then the closed-form input gradient."""
    acc, C, device = g.acc_dtype, g.C, x.device
    need_sums = need_weight or need_bias or (need_input and training)
    sum_dy = sum_dy_xmu = None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(C, dtype=bias_dtype, device=device) if need_bias else None
    if need_sums:
        part_dy, part_dy_xmu = (torch.empty((g.n_splits, C), dtype=acc, device=device) for _ in range(2))
        _launch.launch(kernels._backward_reduce_kernel, g.grid, (x, dy, mean, part_dy, part_dy_xmu, *g.args),
                       g.constexprs, g.num_warps)
        sum_dy, sum_dy_xmu = (torch.empty(C, dtype=acc, device=device) for _ in range(2))
        _launch.launch(kernels._backward_combine_kernel, g.combine_grid,
                       (part_dy, part_dy_xmu, g.n_splits, C, invstd, sum_dy, sum_dy_xmu, grad_weight, grad_bias),
                       dict(GRAD_WEIGHT=need_weight, GRAD_BIAS=need_bias, **g.combine_constexprs),
                       g.combine_warps)
    dx = None
    if need_input:
        dx = torch.empty_like(x)
        _launch.launch(kernels._backward_input_f64_kernel if g.float64 else kernels._backward_input_kernel, g.grid,
                       (x, dy, dx, mean, invstd, std, weight, sum_dy, sum_dy_xmu, float(g.R * g.S), *g.args),
                       dict(TRAINING=training, EPS_INSIDE_SQRT=eps_inside_sqrt, HAS_WEIGHT=weight is not None,
                            **g.constexprs),
                       g.num_warps)
    return dx, grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """Batch norm with the closed-form backward. Arguments are checked by
    :func:`gpuopt.functional.batch_norm`, which is the way to call this."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                eps_inside_sqrt):
        x, R, C, S, channels_last = view_of(input)
        device = x.device
        g = make_grid(R, C, S, channels_last, x.element_size(), use_gpu_config(device),
                      _sm_count(device.index if device.index is not None else torch.cuda.current_device())
                      if device.type == "cuda" else ASSUMED_SM_COUNT)
        if training:
            y, mean, invstd, std = forward_train(x, g, weight, bias, running_mean, running_var, num_batches_tracked,
                                                 momentum, eps, eps_inside_sqrt)
            ctx.save_for_backward(x, weight, mean, invstd, std)
        else:
            y = forward_eval(x, g, weight, bias, running_mean, running_var, eps, eps_inside_sqrt)
            ctx.save_for_backward(x, weight, running_mean, running_var, None)
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
    x, weight, mean, invstd, std = ctx.saved_tensors
    g = ctx.grid
    if not ctx.training:  # μ and s are the running statistics: constants
        var = invstd.to(g.acc_dtype)
        mean = mean.to(g.acc_dtype)
        invstd = 1.0 / (torch.sqrt(var + ctx.eps) if ctx.eps_inside_sqrt else torch.sqrt(var) + ctx.eps)
    dy = same_layout(grad_output, x, g.channels_last)
    dx, grad_weight, grad_bias = backward(
        x, dy, g, weight, mean, invstd, std, ctx.training, ctx.eps_inside_sqrt,
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
