"""Batch normalization (the seed's B.0.2) as split reductions and elementwise passes.

For one channel i with the K = N·S values Z_i1 .. Z_iK of a batch::

    μ_i = (1/K) Σ_j Z_ij        σ_i² = (1/K) Σ_j (Z_ij - μ_i)²
    Z̄_ij = (Z_ij - μ_i) / s_i   s_i = sqrt(σ_i² + ε) (PyTorch)  or  σ_i + ε (the seed)
    Ẑ_ij = G_i Z̄_ij + B_i

    ∂L/∂B_i = Σ_j dẐ_ij         ∂L/∂G_i = Σ_j dẐ_ij Z̄_ij
    ∂L/∂Z_ij = G_i / s_i · [dẐ_ij - ∂L/∂B_i / K - (s_i/r_i) Z̄_ij ∂L/∂G_i / K]

with r_i = s_i for PyTorch's ε placement and r_i = σ_i for the seed's (see
``gpuopt.reference.batch_norm_backward`` for the derivation).

**Data layout.** The host views the input as ``(R, C, S)`` with strides ``(C·S, S, 1)``:

* channels-first (``CHANNELS_LAST=False``): NCHW-contiguous input, R = N, S = H·W (or L, D·H·W).
  A program owns one channel and a range of (row, column) tiles ``[BLOCK_R, BLOCK_K]`` of its
  ``R × S`` values; a tile row is a contiguous run of S values.
* channels-last (``CHANNELS_LAST=True``): NHWC-contiguous or 2-D input, R = N·S, S = 1. A program
  owns ``BLOCK_K`` adjacent channels (a contiguous run of each row) and a range of rows.

**Short rows.** Channels-first input whose rows are short and cannot be read 16 bytes at a time
(S < 64 and S not a multiple of 16 bytes' worth: (256, 2048, 7, 7) has rows of 49) is read the
channels-last way: each of the N rows is C·S contiguous values, so a program owns ``BLOCK_K``
adjacent *columns* — column k of channel k // S — and every lane and every 16-byte access is
used. The reductions then keep one partial per column (C·S per split); the combine kernels fold a
channel's S columns with its splits (``group`` = S). Per-channel values are read per column
(``_channel_values``). Channels-last proper is the case S = 1.

Axis 0 of the grid is the channel (block), axis 1 the *split*: the rows (and, channels-first, the
columns) of a channel are spread over many programs, so a layer with 64 channels still fills
every SM. Each reduction kernel writes one partial per (split, channel); a small combine kernel
folds the partials per channel. Every pass uses the same grid, so all its programs load their
per-channel constants once.

Statistics accumulate in ``ACC`` (fp32, or fp64 for fp64 input) with Welford's update per lane, on
values shifted by the channel's first value, and Chan's combine across lanes and splits: a channel
with mean 1e4 and std 1 in fp32 keeps its variance to ~1e-6, where E[x²] - E[x]² would lose it all.

Bytes per element (memory floor): forward statistics read x; normalize reads x, writes y;
backward reduction reads x and dẐ; backward input reads x and dẐ, writes ∂L/∂Z. 3 + 5 = 8 passes.
"""

import triton
import triton.language as tl

from ._multi_tensor import float64_variant, store_as

# A training forward keeps its per-channel results in one tensor, C values each (the backward
# reads it): μ, 1/s, σ (the seed's ε placement only) and the shift the statistics used. The same
# allocation holds the statistics pass's partials after them (from plane PARTIALS on): one
# allocation per forward, whose partials live on, unread, until the backward frees it.
MEAN, INVSTD, STD, SHIFT = (tl.constexpr(i) for i in range(4))
N_STATISTICS = 4
PARTIALS = tl.constexpr(N_STATISTICS)
# A reduction writes its partials as planes of n_splits × C values (one per split and channel):
# count, mean, M2 for the statistics; Σ dẐ, Σ dẐ(Z-μ) for the backward, whose scratch first holds
# the folded sums (C values each).
COUNT, PART_MEAN, PART_M2 = (tl.constexpr(i) for i in range(3))
SUM_DY, SUM_DY_XMU = (tl.constexpr(i) for i in range(2))


# ------------------------------------------------------------------------------ tiles -------


@triton.jit
def _program_range(R, n_cols, rows_per_split, cols_per_split, col_splits,
                   CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's rows ``[r_begin, r_stop)``, columns ``[k_begin, k_stop)``, and the offset of
    column 0 of its channel (block) within a row."""
    split = tl.program_id(1)
    r_begin = (split // col_splits) * rows_per_split
    r_stop = tl.minimum(r_begin + rows_per_split, R)
    if CHANNELS_LAST:
        k_begin = tl.program_id(0) * BLOCK_K  # the columns are channels
        k_stop = k_begin + BLOCK_K
        col_base = 0
    else:
        k_begin = (split % col_splits) * cols_per_split
        k_stop = tl.minimum(k_begin + cols_per_split, n_cols)
        col_base = tl.program_id(0).to(tl.int64) * n_cols  # channel c starts at c·S in each row
    return r_begin, r_stop, k_begin, k_stop, col_base


@triton.jit
def _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Element offsets and mask of the ``[BLOCK_R, BLOCK_K]`` tile at row r0, column k0."""
    rows = r0 + tl.arange(0, BLOCK_R)
    # k0 is a multiple of BLOCK_K; saying so (k0 // BLOCK_K * BLOCK_K is an identity the compiler
    # can read, unlike a hint on a loop variable) lets it prove runs of columns contiguous.
    cols = (k0 // BLOCK_K) * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets = (rows.to(tl.int64) * row_stride + col_base)[:, None] + cols[None, :]
    mask = (rows < R)[:, None] & (cols < n_cols)[None, :]
    return offsets, mask


@triton.jit
def _layout(C, S, CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr):
    """(row stride, number of columns) of the (R, C, S) view.

    The host checks that ``VEC`` divides the row length (S, or C·S channels-last). Writing the
    length as ``n // VEC * VEC`` (an identity then) tells the compiler so: every row start and
    every channel offset c·S is a multiple of VEC elements (16 bytes), and runs of VEC columns
    are masked alike, so tiles are read and written with 16-byte accesses (``ld.global.v4``)."""
    if CHANNELS_LAST:  # (S is 1, or the run of a channel-major row, see "Short rows")
        n_cols = (C * S // VEC) * VEC
        return n_cols, n_cols
    else:
        n_cols = (S // VEC) * VEC
        return n_cols.to(tl.int64) * C, n_cols  # (C may be the constant 1: Triton specialises it)


@triton.jit
def _channel_values(ptr, CHANNELS_LAST: tl.constexpr, C, S, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """This program's per-channel values of ``ptr``: a scalar (channels-first) or a ``[1, BLOCK_K]``
    row that broadcasts over a tile (channels-last: the value of column k's channel, k // S)."""
    if CHANNELS_LAST:
        columns = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        return tl.load(ptr + columns // S, mask=columns < C * S, other=0.0).to(ACC)[None, :]
    else:
        return tl.load(ptr + tl.program_id(0)).to(ACC)


@triton.jit
def _program_mean(stats_ptr, running_mean_ptr, C, S, TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                  BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """μ of this program's channels: the batch's (in the statistics, see MEAN) in training, else
    the running mean."""
    if TRAINING:
        return _channel_values(stats_ptr + MEAN * C, CHANNELS_LAST, C, S, BLOCK_K, ACC)
    else:
        return _channel_values(running_mean_ptr, CHANNELS_LAST, C, S, BLOCK_K, ACC)


@triton.jit
def _program_invstd(stats_ptr, running_var_ptr, eps, C, S, TRAINING: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """1/s of this program's channels: the batch's in training, else formed here from the running
    variance (so evaluation needs no statistics pass at all)."""
    if TRAINING:
        return _channel_values(stats_ptr + INVSTD * C, CHANNELS_LAST, C, S, BLOCK_K, ACC)
    else:
        return _inverse_std(_channel_values(running_var_ptr, CHANNELS_LAST, C, S, BLOCK_K, ACC), eps,
                            EPS_INSIDE_SQRT)


@triton.jit
def _partials_width(C, S, CHANNELS_LAST: tl.constexpr):
    """Partials per split: one per channel, or channels-last one per column (C·S: a short row's
    channel has S of them, folded by the combine kernels)."""
    if CHANNELS_LAST:
        return C * S
    else:
        return C


@triton.jit
def _plane(ptr, k, n_splits, width):
    """Plane ``k`` (``n_splits × width`` values, one per split and channel or column) of a
    partials buffer. (A few million values at most: the grid has a few programs per SM.)"""
    return ptr + k * n_splits * width


@triton.jit
def _store_partial(ptr, value, width, CHANNELS_LAST: tl.constexpr, BLOCK_K: tl.constexpr):
    """Store this program's per-channel (channels-last: per-column) partial result at
    ``ptr[split, channel or column]``, ``width`` of them per split."""
    row = ptr + tl.program_id(1).to(tl.int64) * width
    if CHANNELS_LAST:
        columns = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(row + columns, value, mask=columns < width)
    else:
        tl.store(row + tl.program_id(0), value)


@triton.jit
def _finite(shift):
    """The statistics' shift, 0 where the channel's first value is not finite (shifting by it
    would turn every value into inf or NaN)."""
    return tl.where(tl.abs(shift) < float("inf"), shift, 0.0)


@triton.jit
def _infinite_mean_stays(mean, x):
    """An infinite running mean is the mean of the values so far, as a sum would make it (torch's
    mean of a batch with an ``inf`` is ``inf``): it stays while the new value ``x`` is finite or
    the same infinity; the update's ``mean + (x - mean)/n`` would make it NaN (``inf - inf``). An
    opposite infinity or a NaN still makes it NaN."""
    return (tl.abs(mean) == float("inf")) & ((x == mean) | (tl.abs(x) < float("inf")))


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s pairwise combine of two (mean, M2 = Σ(x-mean)², count) summaries."""
    n = n_a + n_b
    w_b = n_b / tl.maximum(n, 1.0)
    delta = mean_b - mean_a
    mean = tl.where(_infinite_mean_stays(mean_a, mean_b), mean_a, mean_a + delta * w_b)
    return mean, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _welford_merge(mean, m2, count, axis: tl.constexpr):
    """Merge Welford summaries along ``axis``, exactly (the two-pass form of Chan's formula)::

        n = Σ n_l,   mean = Σ n_l mean_l / n,   M2 = Σ [M2_l + n_l (mean_l - mean)²]

    Three sums rather than a tree of pairwise combines: the same result, cheaper on the GPU, and
    ``tl.sum`` is vectorised in the interpreter where a custom ``tl.reduce`` runs in Python."""
    n = tl.sum(count, axis)
    merged_mean = tl.sum(count * mean, axis) / tl.maximum(n, 1.0)
    deviation = mean - tl.expand_dims(merged_mean, axis)
    return merged_mean, tl.sum(m2 + count * deviation * deviation, axis), n


@triton.jit
def _fold_lanes(mean, m2, count, CHANNELS_LAST: tl.constexpr):
    """A tile of per-lane summaries merged to this program's per-channel summary: over rows
    (channels-last) or everything (one channel)."""
    if not CHANNELS_LAST:
        mean, m2, count = _welford_merge(mean, m2, count, 1)
    return _welford_merge(mean, m2, count, 0)


@triton.jit
def _reduce_tile(value, CHANNELS_LAST: tl.constexpr):
    """Sum a tile to this program's per-channel values: over rows (channels-last) or everything."""
    if CHANNELS_LAST:
        return tl.sum(value, axis=0)
    else:
        return tl.sum(tl.sum(value, axis=1), axis=0)


# ------------------------------------------------------------------------ forward ----------


@triton.jit
def _stats_kernel(x_ptr, stats_ptr, batches_ptr, R, C, S, rows_per_split, cols_per_split, col_splits,
                  COUNT_BATCH: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                  VEC: tl.constexpr, ACC: tl.constexpr):
    """Per (split, channel): count, mean and M2 of this program's values of the channel, the mean
    relative to the channel's shift (written to the statistics by split 0).

    Every lane keeps its own Welford summary (count, mean, M2) and adds one value per tile::

        n ← n + 1,   δ = x - mean,   mean ← mean (1 - 1/n) + x/n,   M2 ← M2 + δ (x - mean)

    and the lanes are merged at the end (Chan et al.). The mean is updated as the weighted sum
    ``mean (1 - 1/n) + x/n`` rather than ``mean + δ/n`` (one multiply more an element): an
    infinite value then makes the mean infinite, as torch's sum does, where ``δ = x - inf`` would
    make it NaN.

    The values are first shifted by the channel's first value (every program of a channel uses the
    same one). Welford then runs on numbers of the size of σ rather than μ: with μ = 1e4 and σ = 1
    in fp32 the running mean's rounding step drops from 1e-3 to 1e-7 σ, and the variance keeps
    ~6 digits instead of ~4. The partial means stay shifted (O(σ), not O(μ)) until the combine
    kernel has merged them, so the between-split term of M2 keeps its digits too.

    ``COUNT_BATCH``: program (0, 0) also adds this batch to the module's ``num_batches_tracked``
    (one element), which the combine kernel, launched after this one, reads."""
    row_stride, n_cols = _layout(C, S, CHANNELS_LAST, VEC)
    r_begin, r_stop, k_begin, k_stop, col_base = _program_range(R, n_cols, rows_per_split, cols_per_split, col_splits,
                                                                CHANNELS_LAST, BLOCK_K)
    if CHANNELS_LAST:  # row 0, the first column of each column's channel
        columns = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        shift = _finite(tl.load(x_ptr + columns // S * S, mask=columns < C * S, other=0.0).to(ACC))
        if tl.program_id(1) == 0:  # (stored now: nothing of it stays live through the loops)
            tl.store(stats_ptr + SHIFT * C + columns // S, shift, mask=(columns < C * S) & (columns % S == 0))
        tile_shift = shift[None, :]
    else:
        shift = _finite(tl.load(x_ptr + col_base).to(ACC))  # row 0, column 0 of channel c
        if tl.program_id(1) == 0:
            tl.store(stats_ptr + SHIFT * C + tl.program_id(0), shift)
        tile_shift = shift
    # Full tiles (rows below r_full, columns below k_full): every lane sees one more value, so
    # the count is one scalar and 1/n one reciprocal per tile, and no mask.
    r_full = r_begin + (r_stop - r_begin) // BLOCK_R * BLOCK_R
    k_full = k_begin + (tl.minimum(k_stop, n_cols) - k_begin) // BLOCK_K * BLOCK_K
    n_full = tl.zeros([], ACC)
    mean = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for r0 in range(r_begin, r_full, BLOCK_R):
        for k0 in range(k_begin, k_full, BLOCK_K):
            offsets, _ = _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + offsets).to(ACC) - tile_shift
            n_full += 1.0
            delta = x - mean
            mean = mean * (1.0 - 1.0 / n_full) + x * (1.0 / n_full)  # (mean + δ/n; inf where a sum is inf)
            m2 += delta * (x - mean)
    # Folded to this program's per-channel values before the edge tiles, so that the edge loop
    # does not carry the full tiles' summary in registers.
    mean, m2, count = _fold_lanes(mean, m2, tl.zeros([BLOCK_R, BLOCK_K], ACC) + n_full, CHANNELS_LAST)
    # Edge tiles (the columns past k_full, then the rows past r_full; a few per program at most):
    # each summarised on its own (count, mean, M2 over the tile's valid lanes) and merged into
    # the program's summary by Chan's formula, so that no per-lane state is carried.
    for r0 in range(r_begin, r_stop, BLOCK_R):
        for k0 in range(tl.where(r0 < r_full, k_full, k_begin), k_stop, BLOCK_K):
            offsets, mask = _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R, BLOCK_K)
            x = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC) - tile_shift, 0.0)
            tile_count = _reduce_tile(mask.to(ACC), CHANNELS_LAST)
            tile_mean = _reduce_tile(x, CHANNELS_LAST) / tl.maximum(tile_count, 1.0)
            if CHANNELS_LAST:
                deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
            else:
                deviation = tl.where(mask, x - tile_mean, 0.0)
            tile_m2 = _reduce_tile(deviation * deviation, CHANNELS_LAST)
            mean, m2, count = _welford_combine(mean, m2, count, tile_mean, tile_m2, tile_count)
    n_splits, width, partials_ptr = tl.num_programs(1), _partials_width(C, S, CHANNELS_LAST), stats_ptr + PARTIALS * C
    _store_partial(_plane(partials_ptr, COUNT, n_splits, width), count, width, CHANNELS_LAST, BLOCK_K)
    _store_partial(_plane(partials_ptr, PART_MEAN, n_splits, width), mean, width, CHANNELS_LAST, BLOCK_K)
    _store_partial(_plane(partials_ptr, PART_M2, n_splits, width), m2, width, CHANNELS_LAST, BLOCK_K)
    if COUNT_BATCH:  # (last: nothing of it is live through the loops)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(batches_ptr, tl.load(batches_ptr) + 1)


@triton.jit
def _sqrt_rn(x):
    """Correctly rounded square root (tl.sqrt may be approximate; fp64's is always exact)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _inverse_std(var, eps, EPS_INSIDE_SQRT: tl.constexpr):
    """1/s: 1/sqrt(σ² + ε) (PyTorch) or 1/(σ + ε) (the seed), correctly rounded."""
    if EPS_INSIDE_SQRT:
        s = _sqrt_rn(var + eps)
    else:
        s = _sqrt_rn(var) + eps
    if s.dtype == tl.float64:
        return 1.0 / s
    else:
        return tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def _partial_offsets(p0, n_splits, group, C, channels, in_range, BLOCK_SPLITS: tl.constexpr,
                     GROUPED: tl.constexpr):
    """Offsets and mask of a tile of partials, ``BLOCK_SPLITS`` of each of ``channels`` from
    partial ``p0``. A channel has ``group`` partials per split (planes of ``n_splits × C·group``):
    1, or S where the reductions ran over short rows (columns c·S .. c·S + S-1). The tile's last
    (fastest) axis is the one adjacent in memory, so that neighbouring threads read neighbouring
    values: channels, ``[BLOCK_SPLITS, BLOCK_C]``; or with ``GROUPED``, a channel's columns,
    ``[BLOCK_C, BLOCK_SPLITS]``."""
    parts = p0 + tl.arange(0, BLOCK_SPLITS)
    part_offsets = (parts // group).to(tl.int64) * (C * group) + parts % group
    valid = parts < n_splits * group
    if GROUPED:
        return (channels * group)[:, None] + part_offsets[None, :], in_range[:, None] & valid[None, :]
    else:
        return part_offsets[:, None] + channels[None, :], valid[:, None] & in_range[None, :]


@triton.jit
def _stats_combine_kernel(partials_ptr, stats_ptr, n_splits, group, C, running_mean_ptr, running_var_ptr, batches_ptr,
                          momentum, eps, summary_ptr, EPS_INSIDE_SQRT: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                          CUMULATIVE: tl.constexpr, SUMMARY: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                          BLOCK_C: tl.constexpr, GROUPED: tl.constexpr, ACC: tl.constexpr):
    """Fold the partials of ``BLOCK_C`` channels into μ, 1/s (and σ for the seed's backward), and
    update the running statistics as torch.nn.BatchNorm does (``group`` partials per channel and
    split, see ``_partial_offsets``; ``partials_ptr`` None: the layer's own, after its statistics)::

        running_mean ← (1 - m) running_mean + m μ
        running_var  ← (1 - m) running_var  + m σ² K/(K-1)      (unbiased)

    m is ``momentum``, or 1/t with t = ``num_batches_tracked`` (already counting this batch) for
    the cumulative average (the seed's γ_t = (t-1)/t), read on the device: no host sync.
    ``momentum`` and ``eps`` are used in ACC (float64 input: the float64 variant gets them exactly).

    ``SUMMARY`` (SyncBatchNorm): store the channel's (count, μ, M2) in ``summary_ptr`` instead (one
    "split" of partials: planes COUNT, PART_MEAN, PART_M2 of C values), for the ranks' summaries to
    be gathered and folded by this kernel again, as ``n_splits`` partials with a zero shift."""
    if partials_ptr is None:
        partials = stats_ptr + PARTIALS * C
    else:
        partials = partials_ptr
    momentum, eps = tl.full([], momentum, ACC), tl.full([], eps, ACC)
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = channels < C
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, n_splits * group, BLOCK_SPLITS):
        offsets, mask = _partial_offsets(p0, n_splits, group, C, channels, in_range, BLOCK_SPLITS, GROUPED)
        part_mean, part_m2, part_count = _welford_merge(
            tl.load(_plane(partials, PART_MEAN, n_splits, C * group) + offsets, mask=mask, other=0.0),
            tl.load(_plane(partials, PART_M2, n_splits, C * group) + offsets, mask=mask, other=0.0),
            tl.load(_plane(partials, COUNT, n_splits, C * group) + offsets, mask=mask, other=0.0),
            1 if GROUPED else 0)
        mean, m2, count = _welford_combine(mean, m2, count, part_mean, part_m2, part_count)
    mean += tl.load(stats_ptr + SHIFT * C + channels, mask=in_range, other=0.0)  # un-shift, once merged
    if SUMMARY:
        tl.store(_plane(summary_ptr, COUNT, 1, C) + channels, count, mask=in_range)
        tl.store(_plane(summary_ptr, PART_MEAN, 1, C) + channels, mean, mask=in_range)
        tl.store(_plane(summary_ptr, PART_M2, 1, C) + channels, m2, mask=in_range)
        return
    var = m2 / tl.maximum(count, 1.0)  # (count is 0 only in masked-off channels, and on ranks of no batch)
    tl.store(stats_ptr + MEAN * C + channels, mean, mask=in_range)
    tl.store(stats_ptr + INVSTD * C + channels, _inverse_std(var, eps, EPS_INSIDE_SQRT), mask=in_range)
    if not EPS_INSIDE_SQRT:  # the seed's backward also needs σ
        tl.store(stats_ptr + STD * C + channels, _sqrt_rn(var), mask=in_range)
    if UPDATE_RUNNING:
        if CUMULATIVE:
            factor = 1.0 / tl.load(batches_ptr).to(ACC)
        else:
            factor = momentum
        running_mean = tl.load(running_mean_ptr + channels, mask=in_range).to(ACC)
        running_var = tl.load(running_var_ptr + channels, mask=in_range).to(ACC)
        store_as(running_mean_ptr + channels, (1.0 - factor) * running_mean + factor * mean, in_range)
        store_as(running_var_ptr + channels, (1.0 - factor) * running_var + factor * (m2 / tl.maximum(count - 1.0, 1.0)), in_range)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, stats_ptr, running_mean_ptr, running_var_ptr, weight_ptr, bias_ptr, eps,
                      R, C, S, rows_per_split, cols_per_split, col_splits,
                      TRAINING: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      VEC: tl.constexpr, ACC: tl.constexpr):
    """Ẑ = G (Z - μ)/s + B, elementwise, with the batch's μ and 1/s in training and the running
    statistics otherwise (inference is this one launch). (Z - μ) is formed before scaling: with
    μ = 1e4, Z·(G/s) - μ·(G/s) would cancel."""
    eps = tl.full([], eps, ACC)
    row_stride, n_cols = _layout(C, S, CHANNELS_LAST, VEC)
    r_begin, r_stop, k_begin, k_stop, col_base = _program_range(R, n_cols, rows_per_split, cols_per_split, col_splits,
                                                                CHANNELS_LAST, BLOCK_K)
    mean = _program_mean(stats_ptr, running_mean_ptr, C, S, TRAINING, CHANNELS_LAST, BLOCK_K, ACC)
    scale = _program_invstd(stats_ptr, running_var_ptr, eps, C, S, TRAINING, EPS_INSIDE_SQRT, CHANNELS_LAST, BLOCK_K,
                            ACC)
    if HAS_WEIGHT:
        scale = scale * _channel_values(weight_ptr, CHANNELS_LAST, C, S, BLOCK_K, ACC)
    if HAS_BIAS:
        shift = _channel_values(bias_ptr, CHANNELS_LAST, C, S, BLOCK_K, ACC)
    else:
        shift = 0.0
    for r0 in range(r_begin, r_stop, BLOCK_R):
        for k0 in range(k_begin, k_stop, BLOCK_K):
            offsets, mask = _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
            store_as(y_ptr + offsets, (x - mean) * scale + shift, mask)


# ----------------------------------------------------------------------- backward ----------


@triton.jit
def _backward_reduce_kernel(x_ptr, dy_ptr, stats_ptr, running_mean_ptr, sums_ptr,
                            R, C, S, rows_per_split, cols_per_split, col_splits,
                            TRAINING: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_K: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    """Per (split, channel): Σ dẐ and Σ dẐ (Z - μ). (∂L/∂G = Σ dẐ Z̄ = (1/s) Σ dẐ (Z - μ).)"""
    row_stride, n_cols = _layout(C, S, CHANNELS_LAST, VEC)
    r_begin, r_stop, k_begin, k_stop, col_base = _program_range(R, n_cols, rows_per_split, cols_per_split, col_splits,
                                                                CHANNELS_LAST, BLOCK_K)
    mean = _program_mean(stats_ptr, running_mean_ptr, C, S, TRAINING, CHANNELS_LAST, BLOCK_K, ACC)
    sum_dy = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    for r0 in range(r_begin, r_stop, BLOCK_R):
        for k0 in range(k_begin, k_stop, BLOCK_K):
            offsets, mask = _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R, BLOCK_K)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(ACC)
            sum_dy += dy
            sum_dy_xmu += dy * (x - mean)  # dy = 0 where masked
    n_splits, width, partials_ptr = tl.num_programs(1), _partials_width(C, S, CHANNELS_LAST), sums_ptr + 2 * C
    _store_partial(_plane(partials_ptr, SUM_DY, n_splits, width), _reduce_tile(sum_dy, CHANNELS_LAST), width,
                   CHANNELS_LAST, BLOCK_K)
    _store_partial(_plane(partials_ptr, SUM_DY_XMU, n_splits, width), _reduce_tile(sum_dy_xmu, CHANNELS_LAST), width,
                   CHANNELS_LAST, BLOCK_K)


@triton.jit
def _backward_combine_kernel(sums_ptr, n_splits, group, C, stats_ptr, running_var_ptr, eps, grad_weight_ptr,
                             grad_bias_ptr,
                             TRAINING: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr, GRAD_WEIGHT: tl.constexpr,
                             GRAD_BIAS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
                             GROUPED: tl.constexpr, ACC: tl.constexpr):
    """Sum the partials per channel (``group`` per split, see ``_partial_offsets``); write ∂L/∂B =
    Σ dẐ and ∂L/∂G = (1/s) Σ dẐ (Z - μ) in the parameters' dtype when they are wanted, and the
    sums for the input gradient."""
    eps = tl.full([], eps, ACC)
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = channels < C
    partials_ptr = sums_ptr + 2 * C
    # Tiles summed elementwise, reduced once after the loop. (A reduction inside the loop, along
    # a channel's columns, crashed triton 3.6's thread-locality pass.)
    if GROUPED:
        sum_dy = tl.zeros([BLOCK_C, BLOCK_SPLITS], ACC)
    else:
        sum_dy = tl.zeros([BLOCK_SPLITS, BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros_like(sum_dy)
    for p0 in range(0, n_splits * group, BLOCK_SPLITS):
        offsets, mask = _partial_offsets(p0, n_splits, group, C, channels, in_range, BLOCK_SPLITS, GROUPED)
        sum_dy += tl.load(_plane(partials_ptr, SUM_DY, n_splits, C * group) + offsets, mask=mask, other=0.0)
        sum_dy_xmu += tl.load(_plane(partials_ptr, SUM_DY_XMU, n_splits, C * group) + offsets, mask=mask, other=0.0)
    sum_dy = tl.sum(sum_dy, axis=1 if GROUPED else 0)
    sum_dy_xmu = tl.sum(sum_dy_xmu, axis=1 if GROUPED else 0)
    tl.store(sums_ptr + SUM_DY * C + channels, sum_dy, mask=in_range)
    tl.store(sums_ptr + SUM_DY_XMU * C + channels, sum_dy_xmu, mask=in_range)
    if GRAD_WEIGHT:
        if TRAINING:
            invstd = tl.load(stats_ptr + INVSTD * C + channels, mask=in_range, other=0.0).to(ACC)
        else:
            invstd = _inverse_std(tl.load(running_var_ptr + channels, mask=in_range, other=1.0).to(ACC), eps,
                                  EPS_INSIDE_SQRT)
        store_as(grad_weight_ptr + channels, sum_dy_xmu * invstd, in_range)
    if GRAD_BIAS:
        store_as(grad_bias_ptr + channels, sum_dy, in_range)


@triton.jit
def _backward_input_kernel(x_ptr, dy_ptr, dx_ptr, stats_ptr, running_var_ptr, weight_ptr, sums_ptr, count, eps,
                           R, C, S, rows_per_split, cols_per_split, col_splits,
                           TRAINING: tl.constexpr, EPS_INSIDE_SQRT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                           VEC: tl.constexpr, ACC: tl.constexpr):
    """∂L/∂Z by the closed form, elementwise::

        ∂L/∂Z = (G/s) · [dẐ - Σ dẐ / K - (Z - μ) · (s/r) (1/s²) Σ dẐ (Z - μ) / K]

    s/r is 1 for PyTorch's ε placement and (σ + ε)/σ for the seed's (0 for a constant channel,
    the limit σ → 0). In evaluation mode μ and s are constants (the running statistics) and
    ∂L/∂Z = (G/s) dẐ."""
    count, eps = tl.full([], count, ACC), tl.full([], eps, ACC)
    row_stride, n_cols = _layout(C, S, CHANNELS_LAST, VEC)
    r_begin, r_stop, k_begin, k_stop, col_base = _program_range(R, n_cols, rows_per_split, cols_per_split, col_splits,
                                                                CHANNELS_LAST, BLOCK_K)
    invstd = _program_invstd(stats_ptr, running_var_ptr, eps, C, S, TRAINING, EPS_INSIDE_SQRT, CHANNELS_LAST, BLOCK_K,
                             ACC)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * _channel_values(weight_ptr, CHANNELS_LAST, C, S, BLOCK_K, ACC)
    if TRAINING:
        mean = _program_mean(stats_ptr, None, C, S, TRAINING, CHANNELS_LAST, BLOCK_K, ACC)
        mean_dy = _channel_values(sums_ptr + SUM_DY * C, CHANNELS_LAST, C, S, BLOCK_K, ACC) / count
        projection = (invstd * invstd * _channel_values(sums_ptr + SUM_DY_XMU * C, CHANNELS_LAST, C, S, BLOCK_K, ACC)
                      / count)
        if not EPS_INSIDE_SQRT:
            std = _channel_values(stats_ptr + STD * C, CHANNELS_LAST, C, S, BLOCK_K, ACC)
            projection = projection * tl.where(std > 0.0, 1.0 / tl.where(std > 0.0, invstd * std, 1.0), 0.0)
    for r0 in range(r_begin, r_stop, BLOCK_R):
        for k0 in range(k_begin, k_stop, BLOCK_K):
            offsets, mask = _tile(r0, k0, R, row_stride, col_base, n_cols, BLOCK_R, BLOCK_K)
            dy = tl.load(dy_ptr + offsets, mask=mask).to(ACC)
            if TRAINING:
                x = tl.load(x_ptr + offsets, mask=mask).to(ACC)
                dx = scale * (dy - mean_dy - (x - mean) * projection)
            else:
                dx = scale * dy
            store_as(dx_ptr + offsets, dx, mask)


# The launches for float64 input: ε, momentum and the count arrive as float64 (see float64_variant).
_stats_combine_f64_kernel = float64_variant(_stats_combine_kernel, ("momentum", "eps"))
_normalize_f64_kernel = float64_variant(_normalize_kernel, ("eps",))
_backward_combine_f64_kernel = float64_variant(_backward_combine_kernel, ("eps",))
_backward_input_f64_kernel = float64_variant(_backward_input_kernel, ("count", "eps"))
