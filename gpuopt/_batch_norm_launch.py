"""The batch-norm kernels' launches (``gpuopt/kernels/batch_norm.py`` holds the kernels and their
equations): the grid of a call's ``(R, C, S)`` view, and the passes of a training forward, an
evaluation forward and a backward, as plain tensors and numbers in, tensors out. Arguments are
checked by ``gpuopt._batch_norm`` before anything here runs."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl

from . import _launch
from ._launch import ASSUMED_SM_COUNT, multiprocessor, use_gpu_config
from .kernels import batch_norm as kernels

# ------------------------------------------------------------------ launch geometry ----------

# A tile of the big passes holds this many elements (2048 fp32 = 8 per thread at 8 warps). The
# interpreter runs tiles one after another in NumPy at a cost per tile, not per element: small
# test inputs (up to 1024 elements) get 64-element tiles (many tiles and splits, so every path
# runs), larger ones a few tiles of up to 16384, so that a small model trains in seconds per epoch.
_GPU_TILE, _GPU_WARPS, _GPU_PROGRAMS_PER_SM = 2048, 8, 4
_INTERPRETER_TILE, _INTERPRETER_MAX_TILE, _INTERPRETER_PROGRAMS = 64, 16384, 3
# The combine kernels fold a [BLOCK_SPLITS, BLOCK_C] tile of partials per iteration. On a GPU the
# channel blocks are narrow (C/16 channels, 4 to 64), so that a layer of 64 channels is folded by
# 16 programs rather than one, and the split blocks wide (up to 2048 values a tile), so that a few
# hundred splits take one or two iterations rather than a serial loop of 16.
_COMBINE_TILE, _INTERPRETER_COMBINE_BLOCK_C = 2048, 64
# Short rows read as columns (see "Short rows"); GPUOPT_SHORT_ROWS=0 reads them as channels-first
# tiles as before, for the bench to weigh one against the other (scripts/gpu_session.sh bn-short-rows).
_SHORT_ROWS = os.environ.get("GPUOPT_SHORT_ROWS", "1") != "0"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _column_block(n_cols: int, largest: int) -> int:
    """The power-of-2 tile width that wastes the fewest lanes on rows of ``n_cols`` values (the
    widest among near-ties: fewer iterations)."""
    candidates = [b for b in (2 ** i for i in range(11)) if min(_next_power_of_2(n_cols), 32) <= b <= largest]
    utilisation = {b: n_cols / (_cdiv(n_cols, b) * b) for b in candidates}
    best = max(utilisation.values())
    return max(b for b, u in utilisation.items() if u >= best - 0.02)


@dataclass(frozen=True)
class Grid:
    """How the passes over one (R, C, S) view are split into programs (see gpuopt/kernels/batch_norm.py)."""

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
    combine_split_cap: int  # the combine kernels fold at most this many splits at a time
    combine_block_c: int  # ... of this many channels, one program per channel block
    combine_warps: int
    float64: bool  # accumulate in float64 (float64 input), else float32
    short_rows: bool = False  # channels-first rows read as channels-last columns (see "Short rows")

    # What every launch over this view passes, made once per view (the grid is cached): the host
    # cost of a layer is then the tensors it allocates and the launches themselves.

    @functools.cached_property
    def grid(self):
        return (self.channel_blocks, self.n_splits)

    @functools.cached_property
    def combine_grid(self):
        return (_cdiv(self.C, self.combine_block_c),)

    @functools.cached_property
    def acc_dtype(self):
        return torch.float64 if self.float64 else torch.float32

    @functools.cached_property
    def group(self) -> int:
        """Partials per channel and split: S for short rows (one per column), else 1."""
        return self.S if self.short_rows else 1

    @functools.cached_property
    def partials_width(self) -> int:
        """Partials per split of a reduction pass."""
        return self.C * self.group

    def combine_block_splits(self, n_partials: int) -> int:
        """Partials of a channel a combine kernel folds per step when it folds ``n_partials``
        (the layer's splits × group, or SyncBatchNorm's ranks)."""
        return min(_next_power_of_2(n_partials), self.combine_split_cap)

    @functools.cached_property
    def combine_constexprs(self):
        return dict(BLOCK_SPLITS=self.combine_block_splits(self.n_splits * self.group), BLOCK_C=self.combine_block_c,
                    GROUPED=self.group > 1, ACC=tl.float64 if self.float64 else tl.float32)

    @functools.cached_property
    def args(self):
        return (self.R, self.C, self.S, self.rows_per_split, self.cols_per_split, self.col_splits)

    @functools.cached_property
    def constexprs(self):
        return dict(CHANNELS_LAST=self.channels_last or self.short_rows, BLOCK_R=self.block_r, BLOCK_K=self.block_k,
                    VEC=self.vec,
                    ACC=tl.float64 if self.float64 else tl.float32)


def _split_tiles(row_tiles: int, col_tiles: int, wanted: int) -> tuple[int, int]:
    """(row tiles, column tiles) per split for about ``wanted`` splits of a channel's tiles: rows
    first, then (channels-first, when a channel has few rows of many values) columns."""
    row_splits = min(row_tiles, wanted)
    col_splits = min(col_tiles, _cdiv(wanted, row_splits))
    return _cdiv(row_tiles, row_splits), _cdiv(col_tiles, col_splits)


def _whole_wave_splits(channel_blocks: int, row_tiles: int, col_tiles: int, wave: int) -> tuple[int, int]:
    """``_split_tiles`` for the split count whose ``channel_blocks × splits`` programs finish
    soonest on a device running ``wave`` of them at a time: time ∝ rounds × tiles per split,
    rounds = ceil(programs / wave). The fewest splits within 3% of the best (each adds a partial
    to combine). One wave when the channel blocks fit in one (64 channels on 528 slots: 8 splits,
    512 programs, not 9 and a second wave of 48); several whose last is nearly full when they do
    not (2048 channels of 8 tiles on 396 slots: 4 splits, 21 rounds of 2 tiles, where 1 split
    takes 6 rounds of 8)."""
    best, choices = float("inf"), []
    for wanted in range(1, max(1, min(row_tiles * col_tiles, _cdiv(16 * wave, channel_blocks))) + 1):
        rows, cols = _split_tiles(row_tiles, col_tiles, wanted)
        splits = _cdiv(row_tiles, rows) * _cdiv(col_tiles, cols)
        time = _cdiv(channel_blocks * splits, wave) * rows * cols
        choices.append((time, splits, rows, cols))
        best = min(best, time)
    return min((splits, rows, cols) for time, splits, rows, cols in choices if time <= best * 1.03)[1:]


@functools.lru_cache(maxsize=256)
def make_grid(R: int, C: int, S: int, channels_last: bool, element_size: int, gpu_config: bool,
              sm_count: int, programs_per_sm: int = _GPU_PROGRAMS_PER_SM) -> Grid:
    """The tiles (from the shape, layout and element size) and the splits of each channel block,
    as many as fill whole waves of ``sm_count × programs_per_sm`` programs (``_whole_wave_splits``;
    ``programs_per_sm``: the passes' compiled occupancy, see ``resident_per_sm``)."""
    if gpu_config:
        # float64 tiles hold half the elements over half the warps: 8 values per thread as in
        # fp32 (the statistics kernel's per-lane Welford state spilled at 2048 fp64 values).
        tile = _GPU_TILE // 2 if element_size == 8 else _GPU_TILE
    elif R * C * S <= 1024:
        tile = _INTERPRETER_TILE
    else:
        tile = min(_INTERPRETER_MAX_TILE, _next_power_of_2(R * C * S // 4))
    wave = sm_count * programs_per_sm if gpu_config else _INTERPRETER_PROGRAMS
    short_rows = _SHORT_ROWS and not channels_last and S < 64 and S % (16 // element_size) != 0  # "Short rows"
    columns = channels_last or short_rows  # programs own runs of columns of every row
    n_cols = C * (S if short_rows else 1) if columns else S
    if columns:
        # A warp reads 32 × 16 bytes: one 128-channel fp32 run (256 for 16-bit types) per row.
        block_k = min(_next_power_of_2(n_cols), 512 // element_size if gpu_config else 64)
        channel_blocks = _cdiv(n_cols, block_k)
    else:
        block_k = _column_block(S, min(tile, 1024))
        channel_blocks = C
    block_r = max(1, tile // block_k)
    # Spread each channel over enough splits to fill whole waves.
    row_tiles, col_tiles = _cdiv(R, block_r), (1 if columns else _cdiv(S, block_k))
    row_tiles_per_split, col_tiles_per_split = _whole_wave_splits(channel_blocks, row_tiles, col_tiles, wave)
    rows_per_split, cols_per_split = row_tiles_per_split * block_r, col_tiles_per_split * block_k
    row_splits = _cdiv(R, rows_per_split)
    # Channels-last columns are channel blocks (grid axis 0), never split.
    col_splits = 1 if columns else _cdiv(S, cols_per_split)
    # 16-byte accesses need every row start 16-byte aligned: VEC elements must divide the row
    # length (channels-first: S, which also aligns each channel's offset c·S; channels-last: C·S).
    vec = 16 // element_size
    while n_cols % vec:
        vec //= 2
    n_splits = row_splits * col_splits
    if gpu_config:
        combine_block_c = min(64, max(4, _next_power_of_2(C) // 16))
        combine_split_cap = _COMBINE_TILE // combine_block_c // (2 if element_size == 8 else 1)
    else:  # the interpreter: a few splits per iteration, so that the loop runs
        combine_block_c, combine_split_cap = _INTERPRETER_COMBINE_BLOCK_C, 4
    return Grid(R, C, S, channels_last, block_r, block_k, vec, channel_blocks, rows_per_split, cols_per_split,
                col_splits, n_splits, (_GPU_WARPS * tile // _GPU_TILE) if gpu_config else 1, combine_split_cap,
                combine_block_c, 4 if gpu_config else 1, element_size == 8, short_rows)


def shared_grid_passes(grid: Grid, dtype: torch.dtype) -> list[tuple]:
    """``(kernel, arguments, constexprs)`` of the four passes launched on ``grid.grid`` for
    ``dtype`` input — statistics, normalize, backward reduction, backward input — as a training
    module in training with fp32 affine parameters launches them (tensors given by their dtypes)."""
    acc, f64 = grid.acc_dtype, grid.float64
    affine = dict(TRAINING=True, EPS_INSIDE_SQRT=True, HAS_WEIGHT=True, **grid.constexprs)
    return [(kernels._stats_kernel, (dtype, acc, torch.int64, *grid.args), dict(COUNT_BATCH=True, **grid.constexprs)),
            (kernels._normalize_f64_kernel if f64 else kernels._normalize_kernel,
             (dtype, dtype, acc, None, None, torch.float32, torch.float32, 1e-5, *grid.args), dict(affine, HAS_BIAS=True)),
            (kernels._backward_reduce_kernel, (dtype, dtype, acc, None, acc, *grid.args), dict(TRAINING=True, **grid.constexprs)),
            (kernels._backward_input_f64_kernel if f64 else kernels._backward_input_kernel,
             (dtype, dtype, dtype, acc, None, torch.float32, acc, 1.0, 1e-5, *grid.args), affine)]


def combine_launches(grid: Grid) -> list[tuple]:
    """``(kernel, arguments, constexprs)`` of the two combine launches of a training layer on
    ``grid`` (tensors given by their dtypes), for the compile report: their tiles grow with the
    splits."""
    acc, f64 = grid.acc_dtype, grid.float64
    common = dict(EPS_INSIDE_SQRT=True, **grid.combine_constexprs)
    return [(kernels._stats_combine_f64_kernel if f64 else kernels._stats_combine_kernel,
             (None, acc, grid.n_splits, grid.group, grid.C, torch.float32, torch.float32, None, 0.1, 1e-5, None),
             dict(common, UPDATE_RUNNING=True, CUMULATIVE=False, SUMMARY=False)),
            (kernels._backward_combine_f64_kernel if f64 else kernels._backward_combine_kernel,
             (acc, grid.n_splits, grid.group, grid.C, acc, None, 1e-5, torch.float32, torch.float32),
             dict(common, TRAINING=True, GRAD_WEIGHT=True, GRAD_BIAS=True))]


def resident_per_sm(grid: Grid, dtype: torch.dtype) -> int | None:
    """Programs per SM that every pass sharing ``grid``'s launch grid keeps resident on the
    current device: the least over ``shared_grid_passes`` compiled (other variants of a pass
    differ by a few registers). A grid sized for it is whole waves for the heaviest pass and one
    partial wave at most for the lighter ones. None through the interpreter. Compiles the
    kernels, launches nothing."""
    counts = [_launch.resident_per_sm(kernel, args, constexprs, grid.num_warps)
              for kernel, args, constexprs in shared_grid_passes(grid, dtype)]
    return None if None in counts else min(counts)


# ------------------------------------------------------------------------ launchers ----------
# Plain tensors and numbers in, tensors out. A ``Passes`` says how the passes over the input's
# (R, C, S) view are split (its ``Grid``) and with which options; arguments are checked by
# gpuopt.functional.batch_norm.


def _fold_constexprs(grid: Grid, n_splits: int, group: int, eps_inside_sqrt: bool, update: bool, cumulative: bool,
                     summary: bool) -> dict:
    """The statistics combine's constexprs for ``n_splits × group`` partials per channel (the
    layer's own, or SyncBatchNorm's ranks, which fold in other tiles)."""
    combine = grid.combine_constexprs
    if n_splits != grid.n_splits or group != grid.group:
        combine = dict(combine, BLOCK_SPLITS=grid.combine_block_splits(n_splits * group), GROUPED=group > 1)
    return dict(EPS_INSIDE_SQRT=eps_inside_sqrt, UPDATE_RUNNING=update, CUMULATIVE=cumulative, SUMMARY=summary,
                **combine)


@dataclass(frozen=True)
class Passes:
    """What a batch-norm call's launches take besides its tensors: the grid of the input's view,
    the options, and which optional tensors it has. Made per call, or kept by a module between
    calls while nothing it was made from changed (``gpuopt._batch_norm.ModulePlan``).

    Each pass is a ``_launch.Launch`` made on first use, its constexprs resolved once: the calls of
    one layer pass arguments of the same kinds (its own tensors, scratch just allocated, a module's
    plan checks its input), so after its first launch each is one call of the compiled launcher.
    The launchers below keep that promise only when every tensor they allocate, and the upstream
    gradient, is 16-byte aligned (``_launch.aligned16``), and launch keyed otherwise."""

    grid: Grid
    training: bool
    momentum: float | None
    eps: float
    eps_inside_sqrt: bool
    has_weight: bool
    has_bias: bool
    running: bool  # running statistics given: updated in training, read in evaluation
    count: bool = False  # training: the statistics pass adds this batch to num_batches_tracked

    @functools.cached_property
    def cumulative(self) -> bool:
        """momentum=None: the running statistics' factor is 1/t, read from num_batches_tracked."""
        return self.training and self.running and self.momentum is None

    @functools.cached_property
    def momentum_value(self) -> float:
        """``momentum`` as the combine kernel takes it (None, the cumulative average: unused)."""
        return 0.0 if self.momentum is None else float(self.momentum)

    @functools.cached_property
    def statistics_pass(self) -> _launch.Launch:  # (x, statistics, num_batches_tracked)
        g = self.grid
        return _launch.Launch(kernels._stats_kernel, g.grid, dict(COUNT_BATCH=self.count, **g.constexprs), g.num_warps,
                              g.args)

    @functools.cached_property
    def fold_pass(self) -> _launch.Launch:  # (None, statistics, ..., num_batches_tracked)
        g = self.grid
        return _launch.Launch(kernels._stats_combine_f64_kernel if g.float64 else kernels._stats_combine_kernel, g.combine_grid,
                              _fold_constexprs(g, g.n_splits, g.group, self.eps_inside_sqrt, self.running,
                                               self.cumulative, False), g.combine_warps,
                              (self.momentum_value, self.eps, None))

    @functools.cached_property
    def normalize_pass(self) -> _launch.Launch:  # (x, y, statistics, running_mean, running_var, weight, bias)
        g = self.grid
        return _launch.Launch(kernels._normalize_f64_kernel if g.float64 else kernels._normalize_kernel, g.grid,
                              dict(TRAINING=self.training, EPS_INSIDE_SQRT=self.eps_inside_sqrt,
                                   HAS_WEIGHT=self.has_weight, HAS_BIAS=self.has_bias, **g.constexprs), g.num_warps,
                              (self.eps, *g.args))

    @functools.cached_property
    def reduce_pass(self) -> _launch.Launch:  # (x, dy, statistics, running_mean, sums)
        g = self.grid
        return _launch.Launch(kernels._backward_reduce_kernel, g.grid, dict(TRAINING=self.training, **g.constexprs),
                              g.num_warps, g.args)

    @functools.cached_property
    def _backward_folds(self) -> dict:
        return {}

    def backward_fold_pass(self, need_weight: bool, need_bias: bool) -> _launch.Launch:
        """The backward's combine, writing ∂L/∂G and ∂L/∂B as wanted (a backward may want either):
        (sums, n_splits, group, C, statistics, running_var, eps, grad_weight, grad_bias)."""
        folds = self._backward_folds
        found = folds.get((need_weight, need_bias))
        if found is None:
            g = self.grid
            found = folds[need_weight, need_bias] = _launch.Launch(
                kernels._backward_combine_f64_kernel if g.float64 else kernels._backward_combine_kernel, g.combine_grid,
                dict(TRAINING=self.training, EPS_INSIDE_SQRT=self.eps_inside_sqrt, GRAD_WEIGHT=need_weight,
                     GRAD_BIAS=need_bias, **g.combine_constexprs), g.combine_warps)
        return found

    @functools.cached_property
    def input_pass(self) -> _launch.Launch:  # (x, dy, dx, statistics, running_var, weight, sums)
        g = self.grid
        return _launch.Launch(kernels._backward_input_f64_kernel if g.float64 else kernels._backward_input_kernel, g.grid,
                              dict(TRAINING=self.training, EPS_INSIDE_SQRT=self.eps_inside_sqrt,
                                   HAS_WEIGHT=self.has_weight, **g.constexprs), g.num_warps,
                              (float(g.R * g.S), self.eps, *g.args))


def forward_training(x, passes: Passes, weight, bias, running_mean, running_var, num_batches_tracked, *, exchange=None):
    """Statistics (split reduction + combine, running stats updated) then normalize: three
    launches. Returns ``(y, statistics)``: μ, 1/s, σ, shift of each channel (``MEAN`` ...) in
    the accumulation dtype, what the backward needs (then the partials, see ``PARTIALS``). ``passes.count``: the statistics pass first
    adds this batch to ``num_batches_tracked`` (a module's counter; no torch op per step).

    ``exchange`` (SyncBatchNorm): a function from this rank's summary — (count, μ, M2) per channel,
    ``[3, C]`` — to every rank's, ``[3, ranks, C]`` (one all-gather); the statistics are then the
    fold of those, the whole group's batch."""
    g, device = passes.grid, x.device
    statistics = torch.empty(kernels.N_STATISTICS * g.C + 3 * g.n_splits * g.partials_width, dtype=g.acc_dtype, device=device)
    y = torch.empty_like(x)
    cacheable = _launch.aligned16(statistics, y)
    passes.statistics_pass(cacheable, x, statistics, num_batches_tracked if passes.count else None)
    if exchange is None:
        passes.fold_pass(cacheable, None, statistics, g.n_splits, g.group, g.C, running_mean, running_var,
                        num_batches_tracked if passes.cumulative else None)
    else:
        summary = torch.empty(3 * g.C, dtype=g.acc_dtype, device=device)
        fold_statistics(passes, None, g.n_splits, statistics, None, None, None, summary=summary, group=g.group)
        summaries = exchange(summary.view(3, g.C))
        shift = int(kernels.SHIFT.value)
        statistics[shift * g.C:(shift + 1) * g.C].zero_()  # the summaries' means are un-shifted already
        fold_statistics(passes, summaries, summaries.shape[1], statistics, running_mean, running_var,
                        num_batches_tracked)
    passes.normalize_pass(cacheable, x, y, statistics, None, None, weight, bias)
    return y, statistics


def fold_statistics(passes: Passes, partials, n_splits: int, statistics, running_mean, running_var, num_batches_tracked,
                    *, summary=None, group: int = 1) -> None:
    """A combine launch of any partials (SyncBatchNorm's: a rank's own, then the ranks'):
    ``partials`` (planes count, mean, M2 of ``n_splits × C·group`` values: ``group`` per channel
    and split, see "Short rows"; None: the statistics pass's, in ``statistics``) folded into ``statistics`` (μ, 1/s, σ; the running statistics
    updated when given), or, with ``summary``, into the channel's (count, μ, M2) only.
    ``passes``: its C, dtype, combine settings, momentum and ε."""
    g = passes.grid
    update = running_mean is not None
    cumulative = update and passes.momentum is None
    _launch.launch(kernels._stats_combine_f64_kernel if g.float64 else kernels._stats_combine_kernel, g.combine_grid,
                   (partials, statistics, n_splits, group, g.C, running_mean, running_var,
                    num_batches_tracked if cumulative else None,
                    passes.momentum_value, passes.eps, summary),
                   _fold_constexprs(g, n_splits, group, passes.eps_inside_sqrt, update, cumulative,
                                    summary is not None),
                   g.combine_warps)


def forward_eval(x, passes: Passes, weight, bias, running_mean, running_var):
    """One elementwise launch from the running statistics."""
    y = torch.empty_like(x)
    passes.normalize_pass(_launch.aligned16(y), x, y, None, running_mean, running_var, weight, bias)
    return y


def backward(x, dy, passes: Passes, weight, statistics, running_mean, running_var, *, need_input, need_weight,
             need_bias, bias_dtype=None):
    """``(∂L/∂Z, ∂L/∂G, ∂L/∂B)`` (None where not needed): reduction (Σ dẐ, Σ dẐ(Z-μ)) + combine,
    then the closed-form input gradient. With ``statistics`` (a training forward's) the batch's
    μ and s are used; without, the running statistics (constants: ∂L/∂Z = (G/s) dẐ). ``dy``:
    in ``x``'s memory layout."""
    sums, grad_weight, grad_bias = None, None, None
    if need_weight or need_bias or (need_input and statistics is not None):
        sums, grad_weight, grad_bias = backward_sums(x, dy, passes, weight, statistics, running_mean, running_var,
                                                     need_weight=need_weight, need_bias=need_bias,
                                                     bias_dtype=bias_dtype)
    dx = None
    if need_input:
        dx = backward_input(x, dy, passes, weight, statistics, running_var, sums)
    return dx, grad_weight, grad_bias


def backward_sums(x, dy, passes: Passes, weight, statistics, running_mean, running_var, *, need_weight, need_bias,
                  bias_dtype=None):
    """``(sums, ∂L/∂G, ∂L/∂B)``: the reduction and its combine. ``sums[:2C]`` holds Σ dẐ and
    Σ dẐ(Z-μ) per channel (SyncBatchNorm all-reduces them before ``backward_input``)."""
    g, device = passes.grid, x.device
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(g.C, dtype=bias_dtype, device=device) if need_bias else None
    sums = torch.empty(2 * g.C + 2 * g.n_splits * g.partials_width, dtype=g.acc_dtype, device=device)  # sums, partials
    cacheable = _launch.aligned16(dy, statistics, sums, grad_weight, grad_bias)
    passes.reduce_pass(cacheable, x, dy, statistics, running_mean, sums)
    passes.backward_fold_pass(need_weight, need_bias)(cacheable, sums, g.n_splits, g.group, g.C, statistics, running_var,
                                                     passes.eps, grad_weight, grad_bias)
    return sums, grad_weight, grad_bias


def backward_input(x, dy, passes: Passes, weight, statistics, running_var, sums):
    """∂L/∂Z, elementwise: the closed form with the batch's ``statistics`` and ``sums`` (divided by
    this layer's count of values per channel, R·S), or the running statistics' constants."""
    dx = torch.empty_like(x)
    passes.input_pass(_launch.aligned16(dy, dx, statistics, sums), x, dy, dx, statistics, running_var, weight, sums)
    return dx


def grid_of(x: torch.Tensor, R: int, C: int, S: int, channels_last: bool) -> Grid:
    """The launch grid of the (R, C, S) view of ``x`` on its device (cached per shape)."""
    device = x.device
    if device.type == "cuda":
        return _cuda_grid(R, C, S, channels_last, x.dtype,
                          device.index if device.index is not None else torch.cuda.current_device())
    return _cpu_grid(R, C, S, channels_last, x.element_size(), use_gpu_config(device))


@functools.lru_cache(maxsize=256)
def _cpu_grid(R: int, C: int, S: int, channels_last: bool, element_size: int, gpu_config: bool) -> Grid:
    """The interpreter's grid (or, with GPUOPT_GPU_CONFIG=1, an assumed H100's), cached per shape
    as the GPU's is."""
    return make_grid(R, C, S, channels_last, element_size, gpu_config, ASSUMED_SM_COUNT)


@functools.lru_cache(maxsize=256)
def _cuda_grid(R: int, C: int, S: int, channels_last: bool, dtype: torch.dtype, device_index: int) -> Grid:
    """Tiles first, then splits for whole waves of the passes' compiled occupancy on this device
    (the first call of a shape compiles the four passes to read their registers)."""
    element_size, sm_count = dtype.itemsize, multiprocessor(device_index).count
    grid = make_grid(R, C, S, channels_last, element_size, True, sm_count)
    with torch.cuda.device(device_index):
        per_sm = resident_per_sm(grid, dtype)
    return grid if per_sm is None else make_grid(R, C, S, channels_last, element_size, True, sm_count, per_sm)
