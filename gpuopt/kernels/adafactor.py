"""Adafactor (Shazeer & Stern 2018) as ``torch.optim.Adafactor``, every tensor of a group in three
launches. Tensor W with gradient g at step t (from 1), τ = ``beta2_decay``::

    ρ = min(lr, 1/√t);   α = max(ε2, RMS(W)) ρ;   w = t^τ
    2+ dims, each matrix of the last two (R × C; the leading dims are a batch of them):
        r ← lerp(r, mean_C g², w)            row_var   [..., R, 1]
        c ← lerp(c, mean_R g², w)            col_var   [..., 1, C]
        V = r c / max(mean_R r, ε1)
    else:   V ← lerp(V, g², w)               variance  (W's shape)
    u = g / sqrt(max(V, ε1²))
    W ← W (1 - lr λ) - α / max(1, RMS(u) / d) · u

The kernels walk *tiles*: a run of rows of one tensor's matrices (a tensor of 1 or 0 dims is
viewed as rows of ``COLS``), ``ROWS`` rows at a time, each time across every column ``COLS`` at a
time. A matrix of at most ``ROWS`` rows lies in one tile (with others: *packed*); a taller one is
*split* over tiles of ``TILE_ROWS`` rows each. The launches:

1. ``_statistics``: r (a tile has whole rows); per matrix ``c_next = (1 - w) c + w Σ_R g² / R``
   and ``Σ_R r``, into scratch (``column_sums``, ``matrix_sums``). A split matrix's tiles write
   their column sums to ``partials``; the last of them to arrive adds them up (as ``fold_sums``,
   no float atomics). For 0/1-dim tensors: V.
2. ``_norms``: each tensor's Σ W² and Σ u² (``fold_sums``).
3. ``_update``: W; c ← c_next (by the tile that holds the matrix's first row); step + 1.

The column and matrix sums are sums over rows, so when a tensor's rows are sharded over ranks
(FSDP2), one all-reduce between launches 1 and 2 completes them; then only the rank holding the
tensor's ``col_var`` adds its ``(1 - w) c`` (``holds_columns``). The norms are all-reduced after 2.

Bytes per element (fp32): read g; read W, g; read W, g, write W = 24 (AdamW: 28), plus the factors,
O(R + C) per matrix.
"""

import triton
import triton.language as tl

from ._multi_tensor import (Algorithm, finish_launch, float64_variant, fold_sums, hyper, launch_epoch, lerp,
                            load_compute, load_grad, load_param, rounded_as, rounding_seed, scalar, step_flags,
                            step_is_skipped, store_as, store_param, widened)

ROLES = ("param", "grad", "step", "row_var", "col_var", "variance", "master")
HYPER = ("beta2_decay", "eps1", "eps2", "d", "weight_decay")
SUMS = ("param_sq", "update_sq")
AdafactorFlags = step_flags("AdafactorFlags", "", __name__)

# The per-tensor table (int64, N_META numbers a tensor): its tiles' geometry and where its scratch lies.
META = ("numel",  # its elements
        "rows", "columns",  # R and C of each matrix (0/1 dims: ceil(numel / COLS) rows of COLS)
        "factored",  # 2+ dims: row_var and col_var, else variance
        "row_stride", "column_stride",  # in elements, as the parameter is laid out
        "split",  # its matrices have more than ROWS rows: each spans tiles_per_matrix tiles
        "tile_rows", "tiles_per_matrix", "view_rows",  # rows in a tile, tiles of a matrix, rows in all
        "matrices", "tile_matrices",  # matrices in all, and in a packed tile
        "first_tile", "n_tiles",  # its tiles, consecutive in the schedule
        "column_base", "matrix_base", "partial_base", "counter_base",  # its first scratch slots
        "global_rows", "global_numel",  # R and numel of the whole tensor (the means' and RMS's divisors)
        "holds_columns",  # this rank holds its col_var (all but one of the ranks sharing its rows do not)
        "batch_size_0", "batch_stride_0", "batch_size_1", "batch_stride_1",  # the leading dims that cannot
        "batch_size_2", "batch_stride_2")  # be walked as one, innermost first (size 1: none)
N_META = tl.constexpr(len(META))
MAX_BATCH_DIMS = tl.constexpr(3)
_NUMEL, _ROWS, _COLUMNS, _FACTORED, _ROW_STRIDE, _COLUMN_STRIDE, _SPLIT, _TILE_ROWS, _TILES_PER_MATRIX, \
    _VIEW_ROWS, _MATRICES, _TILE_MATRICES, _FIRST_TILE, _N_TILES, _COLUMN_BASE, _MATRIX_BASE, _PARTIAL_BASE, \
    _COUNTER_BASE, _GLOBAL_ROWS, _GLOBAL_NUMEL, _HOLDS_COLUMNS, _BATCH = \
    map(tl.constexpr, range(len(META) - 2 * MAX_BATCH_DIMS + 1))
N_ROLES = tl.constexpr(len(ROLES))
_STEP, _COL_VAR = tl.constexpr(ROLES.index("step")), tl.constexpr(ROLES.index("col_var"))


@triton.jit
def _geometry(meta_ptr, t, BATCH_DIMS: tl.constexpr):
    """Tensor ``t``'s row of the table, a tuple indexed by the ``META`` positions (``_ROWS``, ...);
    of its leading dims, the first ``BATCH_DIMS`` (the launch walks no more)."""
    row = meta_ptr + t * N_META
    fields = ()
    for field in tl.static_range(_BATCH + 2 * BATCH_DIMS):
        fields = fields + (tl.load(row + field),)
    return fields


@triton.jit
def _tile_end(geometry, q0):
    """One past the last row of the tile starting at row ``q0``: a split matrix's tile stops at
    its matrix's end, a packed tile holds whole matrices."""
    end = q0 + geometry[_TILE_ROWS]
    R = geometry[_ROWS]
    return tl.minimum(end, tl.where(geometry[_SPLIT] != 0, (q0 // R + 1) * R, geometry[_VIEW_ROWS]))


@triton.jit
def _rows(geometry, q0, end, sub, ROWS: tl.constexpr, BATCH_DIMS: tl.constexpr):
    """Rows ``sub·ROWS ...`` of the tile starting at row ``q0``: their row index q = b·R + r (matrix
    b, row r; also their index in row_var), which of them the tile has, b, and the element
    offset of each row's first column, from the strides (any dense layout; ``BATCH_DIMS``: the
    most leading dims a tensor of the launch has that cannot be walked as one)."""
    q = q0 + sub * ROWS + tl.arange(0, ROWS)
    R = geometry[_ROWS]
    b = q // R
    offset = (q - b * R) * geometry[_ROW_STRIDE]
    rest = b
    for d in tl.static_range(BATCH_DIMS):
        size = geometry[_BATCH + 2 * d]
        offset += (rest % size) * geometry[_BATCH + 2 * d + 1]
        rest = rest // size
    return q, q < end, b, offset


@triton.jit
def _multiple(x, VEC: tl.constexpr):
    """``x``, known to be a multiple of ``VEC`` (the host's ``VEC`` promise): so stated, the
    compiler sees ``VEC``-element runs in the addresses and masks below and makes 16-byte accesses
    (without it, one element a thread at a time, each row's numbers held for 8 rows: bench/NOTES.md)."""
    return x // VEC * VEC


@triton.jit
def _columns(geometry, q, rows_in, row_offsets, chunk, COLS: tl.constexpr, VEC: tl.constexpr):
    """Columns ``chunk·COLS ...`` of those rows: the column indices, each element's offset, and the
    mask (a 0/1-dim tensor's last row stops at its numel). ``VEC`` > 1: the columns are contiguous
    and every offset, column count and numel a multiple of ``VEC`` (``TilePlan.launch``)."""
    C = _multiple(geometry[_COLUMNS], VEC)
    cols = chunk * COLS + tl.arange(0, COLS)
    if VEC > 1:
        offsets = _multiple(row_offsets, VEC)[:, None] + cols[None, :]
    else:
        offsets = row_offsets[:, None] + cols[None, :] * geometry[_COLUMN_STRIDE]
    mask = rows_in[:, None] & (cols < C)[None, :] & (q[:, None] * C + cols[None, :] < _multiple(geometry[_NUMEL], VEC))
    return cols, offsets, mask


@triton.jit
def _next_columns(column_sums_ptr, col_var_ptr, index, sums, mask, w, rows, holds):
    """``c_next = (1 - w) c + w Σ_R g² / R`` (only the rank holding c adds its term)."""
    kept = widened(tl.load(col_var_ptr + index, mask=tl.where(holds, mask, False), other=0.0))
    tl.store(column_sums_ptr + index, (1.0 - w) * kept + w * (sums / rows), mask=mask)


@triton.jit
def _factored_statistics(i, geometry, q0, end, grad_ptr, row_var_ptr, col_var_ptr, column_sums_ptr, matrix_sums_ptr,
                         partials_ptr, counter_ptr, w, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr,
                         VEC: tl.constexpr, BATCH_DIMS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Launch 1 on one tile of a tensor of 2+ dims (module docstring)."""
    R = geometry[_ROWS]
    C = geometry[_COLUMNS]
    split = geometry[_SPLIT] != 0
    rows = geometry[_GLOBAL_ROWS].to(w.dtype)
    holds = geometry[_HOLDS_COLUMNS] != 0
    columns = column_sums_ptr + geometry[_COLUMN_BASE]
    matrices = matrix_sums_ptr + geometry[_MATRIX_BASE]
    b0 = q0 // R
    packed = tl.minimum(geometry[_TILE_MATRICES], geometry[_MATRICES] - b0)  # matrices of a packed tile
    partial = partials_ptr + geometry[_PARTIAL_BASE] + (i - geometry[_FIRST_TILE]) * (C + 1)
    matrix_sum = tl.zeros([], w.dtype)
    # (at least once: a shard without rows still writes its matrix's sums, 0, for the other ranks')
    for sub in range(0, tl.maximum(tl.cdiv(end - q0, ROWS), 1)):
        q, rows_in, b, row_offsets = _rows(geometry, q0, end, sub, ROWS, BATCH_DIMS)
        k = tl.arange(0, ROWS)
        mine = (b[None, :] == b0 + k[:, None]) & rows_in[None, :]  # [k, row]: the row is of the tile's k-th matrix
        row_sum = tl.zeros([ROWS], w.dtype)
        for chunk in range(0, tl.cdiv(C, COLS)):
            cols, offsets, mask = _columns(geometry, q, rows_in, row_offsets, chunk, COLS, VEC)
            g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, False)
            g2 = tl.where(mask, g * g, 0.0)
            row_sum += tl.sum(g2, axis=1)
            if split:  # this tile's column sums, added up over its sub-tiles
                tl.debug_barrier()  # (the previous sub-tile's stores, by other threads)
                earlier = tl.load(partial + cols, mask=(cols < C) & (sub > 0), other=0.0)
                tl.store(partial + cols, earlier + tl.sum(g2, axis=0), mask=cols < C)
            else:  # a packed tile: each of its matrices' column sums (one tl.dot of `mine` with g²
                for m in range(0, packed):  # would do it, holding 66 more registers: bench/NOTES.md)
                    sums = tl.sum(tl.where((b == b0 + m)[:, None], g2, 0.0), axis=0)
                    _next_columns(columns, col_var_ptr, (b0 + m) * C + cols, sums, cols < C, w, rows, holds)
        r = lerp(load_compute(row_var_ptr + q, rows_in), row_sum / C, w)
        store_as(row_var_ptr + q, r, rows_in)
        r = tl.where(rows_in, widened(rounded_as(r, row_var_ptr)), 0.0)  # (as stored: what mean_R r reads)
        if split:
            matrix_sum += tl.sum(r, axis=0)
        else:
            tl.store(matrices + b0 + k, tl.sum(tl.where(mine, r[None, :], 0.0), axis=1), mask=k < packed)
    if split:  # the last tile of the matrix to arrive adds up the tiles' sums (Σ_R r rides as column C)
        tl.store(partial + C, matrix_sum)
        tl.debug_barrier()
        counter = counter_ptr + geometry[_COUNTER_BASE] + b0
        tiles = geometry[_TILES_PER_MATRIX]
        if tl.atomic_add(counter, 1, sem="acq_rel") == tiles - 1:
            first = partials_ptr + geometry[_PARTIAL_BASE] + b0 * tiles * (C + 1)
            for c0 in range(0, C + 1, COLS):
                cols = c0 + tl.arange(0, COLS)
                sums = tl.zeros([COLS], w.dtype)
                for j in range(0, tiles):
                    sums += tl.load(first + j * (C + 1) + cols, mask=cols <= C, other=0.0, cache_modifier=".cg")
                _next_columns(columns, col_var_ptr, b0 * C + cols, sums, cols < C, w, rows, holds)
                tl.store(matrices + b0 + cols * 0, sums, mask=cols == C)
            tl.store(counter, 0)


@triton.jit
def _variance_statistics(geometry, q0, end, grad_ptr, variance_ptr, w, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr,
                         VEC: tl.constexpr, BATCH_DIMS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Launch 1 on one tile of a tensor of 0/1 dims: V ← lerp(V, g², w)."""
    for sub in range(0, tl.cdiv(end - q0, ROWS)):
        q, rows_in, _, row_offsets = _rows(geometry, q0, end, sub, ROWS, BATCH_DIMS)
        _, offsets, mask = _columns(geometry, q, rows_in, row_offsets, 0, COLS, VEC)
        g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE, False)
        store_as(variance_ptr + offsets, lerp(load_compute(variance_ptr + offsets, mask), g * g, w), mask)


@triton.jit
def _row_factors(geometry, q, rows_in, b, row_var_ptr, matrix_sums_ptr, eps1, factored):
    """Per row, r and max(mean_R r, ε1) of its matrix (zeros for a 0/1-dim tensor)."""
    rows_in = tl.where(factored, rows_in, False)
    r = widened(tl.load(row_var_ptr + q, mask=rows_in, other=0.0))
    sums = tl.load(matrix_sums_ptr + geometry[_MATRIX_BASE] + b, mask=rows_in, other=1.0)
    return r, tl.maximum(sums / geometry[_GLOBAL_ROWS].to(sums.dtype), eps1)


@triton.jit
def _direction(g, offsets, mask, cols, b, r, mean, geometry, col_var_ptr, variance_ptr, column_sums_ptr, eps1,
               factored):
    """u = g / sqrt(max(V, ε1²)), V = r c / max(mean_R r, ε1) (c the new col_var, as it will be
    stored) or the variance."""
    if factored:
        index = geometry[_COLUMN_BASE] + b[:, None] * geometry[_COLUMNS] + cols[None, :]
        c = widened(rounded_as(tl.load(column_sums_ptr + index, mask=mask), col_var_ptr))
        v = r[:, None] * c / mean[:, None]
    else:
        v = load_compute(variance_ptr + offsets, mask)
    return g / tl.sqrt(tl.maximum(v, eps1 * eps1))


@triton.jit
def _directions(geometry, q0, end, ptrs, column_sums_ptr, matrix_sums_ptr, grad_scale_ptr, eps1, decay, step_size,
                seed, FLAGS: tl.constexpr, MOVE: tl.constexpr, VEC: tl.constexpr, BATCH_DIMS: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr):
    """The tile's u, chunk by chunk (``_direction``): with ``MOVE``, W ← W·decay - step_size·u
    (launch 3); else the per-lane sums of W² and u², returned (launch 2; reduced once a tile, so
    that no chunk waits on a cross-warp reduction)."""
    param_ptr, grad_ptr, _, row_var_ptr, col_var_ptr, variance_ptr, master_ptr = ptrs
    factored = geometry[_FACTORED] != 0
    param_sq = tl.zeros([ROWS, COLS], eps1.dtype)
    update_sq = tl.zeros([ROWS, COLS], eps1.dtype)
    for sub in range(0, tl.cdiv(end - q0, ROWS)):
        q, rows_in, b, row_offsets = _rows(geometry, q0, end, sub, ROWS, BATCH_DIMS)
        r, mean = _row_factors(geometry, q, rows_in, b, row_var_ptr, matrix_sums_ptr, eps1, factored)
        for chunk in range(0, tl.cdiv(geometry[_COLUMNS], COLS)):
            cols, offsets, mask = _columns(geometry, q, rows_in, row_offsets, chunk, COLS, VEC)
            g = load_grad(grad_ptr, offsets, mask, grad_scale_ptr, FLAGS.has_grad_scale, FLAGS.maximize)
            weight = load_param(param_ptr, master_ptr, offsets, mask, FLAGS.has_master)
            u = _direction(g, offsets, mask, cols, b, r, mean, geometry, col_var_ptr, variance_ptr, column_sums_ptr,
                           eps1, factored)
            if MOVE:
                store_param(param_ptr, master_ptr, offsets, mask, weight * decay - step_size * u, seed,
                            FLAGS.has_master, FLAGS.stochastic_rounding)
            else:
                param_sq += tl.where(mask, weight * weight, 0.0)
                update_sq += tl.where(mask, u * u, 0.0)
    return param_sq, update_sq


# ------------------------------------------------------------------------------ kernels -----
# All three take the same arguments (the host passes one list): the tile schedule, the
# per-tensor table and role offsets, the roles' bases, the scratch, then the hyperparameters.


@triton.jit
def _tile(i, tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr, n_tensors, bases, lr, VEC: tl.constexpr,
          BATCH_DIMS: tl.constexpr):
    """Schedule entry ``i``: its tensor t, t's pointer in each role (``ROLES`` order) and
    ``_geometry``, the tile's first row and one past its last, and t's step number this step."""
    t = tl.load(tile_tensor_ptr + i)
    ptrs = ()
    for role in tl.static_range(N_ROLES):
        ptrs = ptrs + (bases[role] + _multiple(tl.load(offsets_ptr + role * n_tensors + t), VEC),)
    geometry = _geometry(meta_ptr, t, BATCH_DIMS)
    q0 = tl.load(tile_row_ptr + i)
    step = tl.load(ptrs[_STEP]).to(lr.dtype) + 1.0
    return t, ptrs, geometry, q0, _tile_end(geometry, q0), step


@triton.jit
def _statistics(tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr, n_tiles, n_tensors,
                param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base,
                counter_ptr, column_sums_ptr, matrix_sums_ptr, partials_ptr, sums_ptr, sum_partials_ptr,
                lr, lr_ptr, beta2_decay, eps1, eps2, d, weight_decay, grad_scale_ptr, found_inf_ptr, seed, epoch_ptr,
                FLAGS: tl.constexpr, LR_ON_DEVICE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                COUNT_EPOCH: tl.constexpr, VEC: tl.constexpr, BATCH_DIMS: tl.constexpr, ROWS: tl.constexpr,
                COLS: tl.constexpr):
    """Launch 1: the second-moment statistics (module docstring)."""
    bases = (param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base)
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base)
    if not step_is_skipped(found_inf_ptr, HAS_FOUND_INF):
        for i in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            t, ptrs, geometry, q0, end, step = _tile(i, tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr,
                                                     n_tensors, bases, lr, VEC, BATCH_DIMS)
            _, grad_ptr, _, row_var_ptr, col_var_ptr, variance_ptr, _ = ptrs
            w = tl.exp(hyper(beta2_decay, param_base) * tl.log(step))
            if geometry[_FACTORED] != 0:
                _factored_statistics(i, geometry, q0, end, grad_ptr, row_var_ptr, col_var_ptr, column_sums_ptr,
                                     matrix_sums_ptr, partials_ptr, counter_ptr, w, grad_scale_ptr,
                                     FLAGS.has_grad_scale, VEC, BATCH_DIMS, ROWS, COLS)
            else:
                _variance_statistics(geometry, q0, end, grad_ptr, variance_ptr, w, grad_scale_ptr,
                                     FLAGS.has_grad_scale, VEC, BATCH_DIMS, ROWS, COLS)


@triton.jit
def _norms(tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr, n_tiles, n_tensors,
           param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base,
           counter_ptr, column_sums_ptr, matrix_sums_ptr, partials_ptr, sums_ptr, sum_partials_ptr,
           lr, lr_ptr, beta2_decay, eps1, eps2, d, weight_decay, grad_scale_ptr, found_inf_ptr, seed, epoch_ptr,
           FLAGS: tl.constexpr, LR_ON_DEVICE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
           COUNT_EPOCH: tl.constexpr, VEC: tl.constexpr, BATCH_DIMS: tl.constexpr, ROWS: tl.constexpr,
           COLS: tl.constexpr):
    """Launch 2: each tensor's Σ W² and Σ u², into ``sums`` (two a tensor, ``SUMS``)."""
    bases = (param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base)
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base)
    eps1 = hyper(eps1, param_base)
    if not step_is_skipped(found_inf_ptr, HAS_FOUND_INF):
        for i in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            t, ptrs, geometry, q0, end, step = _tile(i, tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr,
                                                     n_tensors, bases, lr, VEC, BATCH_DIMS)
            param_sq, update_sq = _directions(geometry, q0, end, ptrs, column_sums_ptr, matrix_sums_ptr,
                                              grad_scale_ptr, eps1, 0.0, 0.0, 0, FLAGS, False, VEC, BATCH_DIMS,
                                              ROWS, COLS)
            fold_sums((tl.sum(param_sq), tl.sum(update_sq)), i, t, geometry[_FIRST_TILE], geometry[_N_TILES],
                      counter_ptr, sum_partials_ptr, sums_ptr, 2, COLS)


@triton.jit
def _update(tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr, n_tiles, n_tensors,
            param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base,
            counter_ptr, column_sums_ptr, matrix_sums_ptr, partials_ptr, sums_ptr, sum_partials_ptr,
            lr, lr_ptr, beta2_decay, eps1, eps2, d, weight_decay, grad_scale_ptr, found_inf_ptr, seed, epoch_ptr,
            FLAGS: tl.constexpr, LR_ON_DEVICE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
            COUNT_EPOCH: tl.constexpr, VEC: tl.constexpr, BATCH_DIMS: tl.constexpr, ROWS: tl.constexpr,
            COLS: tl.constexpr):
    """Launch 3: W ← W (1 - lr λ) - α / max(1, RMS(u)/d) · u; col_var ← c_next; step + 1."""
    bases = (param_base, grad_base, step_base, row_var_base, col_var_base, variance_base, master_base)
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, param_base)
    eps1 = hyper(eps1, param_base)
    eps2 = hyper(eps2, param_base)
    d = hyper(d, param_base)
    decay = 1.0 - lr * hyper(weight_decay, param_base)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    epoch = launch_epoch(epoch_ptr, COUNT_EPOCH)
    if not skipped:
        for i in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            t, ptrs, geometry, q0, end, step = _tile(i, tile_tensor_ptr, tile_row_ptr, meta_ptr, offsets_ptr,
                                                     n_tensors, bases, lr, VEC, BATCH_DIMS)
            numel = tl.maximum(geometry[_GLOBAL_NUMEL], 1).to(lr.dtype)
            param_rms = tl.sqrt(tl.load(sums_ptr + 2 * t) / numel)
            update_rms = tl.sqrt(tl.load(sums_ptr + 2 * t + 1) / numel)
            alpha = tl.maximum(eps2, param_rms) * tl.minimum(lr, 1.0 / tl.sqrt(step))
            step_size = alpha / tl.maximum(1.0, update_rms / d)
            _directions(geometry, q0, end, ptrs, column_sums_ptr, matrix_sums_ptr, grad_scale_ptr, eps1, decay,
                        step_size, rounding_seed(seed, t, step, epoch), FLAGS, True, VEC, BATCH_DIMS, ROWS, COLS)
            col_var_ptr = ptrs[_COL_VAR]
            if geometry[_FACTORED] != 0 and geometry[_HOLDS_COLUMNS] != 0:  # c ← c_next, by the matrix's first tile
                R = geometry[_ROWS]
                C = geometry[_COLUMNS]
                columns = column_sums_ptr + geometry[_COLUMN_BASE]
                for b in range(tl.cdiv(q0, R), tl.cdiv(end, R)):
                    for c0 in range(0, C, COLS):
                        index = b * C + c0 + tl.arange(0, COLS)
                        in_matrix = c0 + tl.arange(0, COLS) < C
                        store_as(col_var_ptr + index, tl.load(columns + index, mask=in_matrix), in_matrix)
    finish_launch(counter_ptr, step_base, offsets_ptr, _STEP, n_tensors, skipped, epoch_ptr, True, COUNT_EPOCH, COLS)


FLOAT_ARGUMENTS = ("lr",) + HYPER  # (float64 tensors' launches: exact hyperparameters, as the walk's)
_statistics_f64, _norms_f64, _update_f64 = (float64_variant(kernel, FLOAT_ARGUMENTS)
                                            for kernel in (_statistics, _norms, _update))
TILES_F64 = (_statistics_f64, _norms_f64, _update_f64)


def _hyperparameters(*, beta2_decay, eps1, eps2, d, weight_decay, maximize):
    return dict(beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay), dict(maximize=maximize)


def _states(options) -> tuple:
    return ("row_var", "col_var", "variance")


def _row_shape(shape):
    return None if len(shape) < 2 else (*shape[:-1], 1)


def _column_shape(shape):
    return None if len(shape) < 2 else (*shape[:-2], 1, shape[-1])


def _variance_shape(shape):
    return tuple(shape) if len(shape) < 2 else None


ADAFACTOR = Algorithm(ROLES, HYPER, None, AdafactorFlags, _hyperparameters, states=_states, complex_params=False,
                      sums=SUMS, tiles=(_statistics, _norms, _update),
                      state_shapes=dict(row_var=_row_shape, col_var=_column_shape, variance=_variance_shape))
