"""Adafactor's launch plan: its tensors cut into row tiles for the kernels of
``gpuopt/kernels/adafactor.py`` (three launches a step), with the per-tensor table and scratch
they need. The pointer table, its refresh when tensors move, and the whole-tensor sums' buffers
are ``LaunchPlan``'s; the schedule is of tiles instead of blocks.

Tiles: a matrix of at most ``ROWS`` rows lies in one tile with the next ones (``ROWS // R`` of
them); a taller one is split into tiles of ``ROWS·⌈√⌈R/ROWS⌉⌉`` rows, so that its tiles (each
walking its rows) and the last tile's fold of their column sums (one read of each tile's) are
about equally long. A tensor of 0/1 dims is rows of ``COLS``, ``ROWS`` of them a tile.
"""

from __future__ import annotations

import math

import torch

from . import _launch
from ._distributed import is_dtensor
from ._launch import use_gpu_config
from ._multi_tensor import LaunchPlan, persistent_programs
from .kernels import adafactor as kernels

# (ROWS, COLS, warps): on a GPU 2048 elements a tile step (8 fp32 a thread, as the walk's blocks);
# the interpreter's larger tiles keep its cost down (each tile step costs ~20 nested calls: bench/NOTES.md).
GPU_TILE, INTERPRETER_TILE = (16, 128, 8), (64, 64, 4)
_FLOAT64 = dict(zip(kernels.ADAFACTOR.tiles, kernels.TILES_F64))  # (float64 tensors: exact hyperparameters)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _batch_dims(p: torch.Tensor) -> list[tuple[int, int]]:
    """The leading dims of ``p`` (all but the last two) as (size, stride), innermost first, size-1
    dims dropped and neighbours that step evenly merged (a contiguous batch is one dim)."""
    dims = []
    for size, stride in sorted(((n, s) for n, s in zip(p.shape[:-2], p.stride()[:-2]) if n != 1),
                               key=lambda d: d[1]):
        if dims and stride == dims[-1][0] * dims[-1][1]:
            dims[-1] = (dims[-1][0] * size, dims[-1][1])
        else:
            dims.append((size, stride))
    return dims


class TilePlan(LaunchPlan):
    """``LaunchPlan`` for ``kernels.adafactor``: ``roles`` as the algorithm's (``ROLES``), every
    tensor of every role the parameter's, its own factor states or a stand-in."""

    def __init__(self, roles: list[list[torch.Tensor]], block: int | None = None):
        params = roles[0]
        self.device = params[0].device
        self.n_tensors = len(params)
        self.float64 = params[0].dtype == torch.float64
        self.numels = tuple(p.numel() for p in params)
        self.layout = tuple((p.shape, p.stride()) for p in params)
        self.rows, self.cols, self.num_warps = GPU_TILE if use_gpu_config(self.device) else INTERPRETER_TILE
        table, tile_tensor, tile_row = [], [], []
        self.batch_dims = 0  # (the most leading dims a tensor walks: the kernels' BATCH_DIMS)
        bases = dict(column_base=0, matrix_base=0, partial_base=0, counter_base=1 + self.n_tensors)
        for t, p in enumerate(params):
            meta = dict(self._geometry(p), first_tile=len(tile_tensor), **bases)
            if meta["split"]:  # each tile's first row
                starts = [b * meta["rows"] + j * meta["tile_rows"] for b in range(meta["matrices"])
                          for j in range(meta["tiles_per_matrix"])]
            else:
                starts = list(range(0, meta["view_rows"], max(meta["tile_rows"], 1)))
            if meta["factored"] and not roles[kernels.ROLES.index("col_var")][t].numel():
                meta["holds_columns"] = 0  # a shard without its col_var (FSDP2: all ranks but one)
            starts = starts or [0]  # (an empty tensor keeps one tile: its sums and step)
            meta["n_tiles"] = len(starts)
            tile_tensor += [t] * len(starts)
            tile_row += starts
            if meta["factored"]:
                bases["column_base"] += meta["matrices"] * meta["columns"]
                bases["matrix_base"] += meta["matrices"]
            if meta["split"]:
                bases["partial_base"] += len(starts) * (meta["columns"] + 1)
                bases["counter_base"] += meta["matrices"]
            table.append([meta[field] for field in kernels.META])
        self.n_blocks = len(tile_tensor)  # (LaunchPlan.sum_buffers: one set of partial sums a schedule entry)
        self.tile_tensor = torch.tensor(tile_tensor, dtype=torch.int32).to(self.device)
        self.tile_row = torch.tensor(tile_row, dtype=torch.int64).to(self.device)
        self._local_table = torch.tensor(table, dtype=torch.int64)  # (as the local shards see it: shard())
        self.meta = self._local_table.to(self.device)
        self.row_groups, self.shared = (), (0, 0)
        # VEC, the elements of the widest role in 16 bytes: when every tensor's columns are contiguous,
        # its counts and strides multiples of VEC and its address 16-byte aligned (``aligned``), the
        # kernels are told so and make 16-byte accesses (narrower roles beside a wider one 8-byte
        # ones, in the same layout: as the walk's RUN, gpuopt/_launch.py; bench/NOTES.md).
        field = kernels.META.index
        self.vec = 16 // max(role[0].element_size() for k, role in enumerate(roles) if kernels.ROLES[k] != "step")
        self.multiples_of_vec = all(row[field("column_stride")] == 1 and all(
            row[field(name)] % self.vec == 0 for name in ("numel", "columns", "row_stride", "batch_stride_0",
                                                          "batch_stride_1", "batch_stride_2")) for row in table)
        dtype = torch.float64 if self.float64 else torch.float32
        self.column_sums = torch.zeros(max(bases["column_base"], 1), dtype=dtype, device=self.device)
        self.matrix_sums = torch.zeros(max(bases["matrix_base"], 1), dtype=dtype, device=self.device)
        self.partials = torch.zeros(max(bases["partial_base"], 1), dtype=dtype, device=self.device)
        self.counter = torch.zeros(bases["counter_base"], dtype=torch.int32, device=self.device)
        self.grid = (min(self.n_blocks, persistent_programs(self.device, self.num_warps)),)
        self._sums = None
        self._addresses = None
        self.refresh(roles)

    def _geometry(self, p: torch.Tensor) -> dict:
        """The table's numbers for parameter ``p`` that depend on its shape and strides alone."""
        ROWS, COLS = self.rows, self.cols
        n = p.numel()
        if p.dim() < 2:  # rows of COLS elements
            view_rows = _cdiv(n, COLS)
            return dict(numel=n, rows=max(view_rows, 1), columns=COLS, factored=0, row_stride=COLS, column_stride=1,
                        split=0, tile_rows=ROWS, tiles_per_matrix=1, view_rows=view_rows, matrices=1,
                        tile_matrices=1, global_rows=1, global_numel=n, holds_columns=1, **self._batch_fields([]))
        R, C = p.shape[-2], p.shape[-1]
        matrices = math.prod(p.shape[:-2])
        dims = _batch_dims(p)
        if len(dims) > kernels.MAX_BATCH_DIMS:
            raise ValueError(f"Adafactor: a parameter of shape {tuple(p.shape)} and strides {p.stride()} has more "
                             f"than {kernels.MAX_BATCH_DIMS} leading dims that cannot be walked as one; make it "
                             "contiguous")
        split = R > ROWS
        if split:
            tile_rows = ROWS * math.ceil(math.sqrt(_cdiv(R, ROWS)))
            tiles_per_matrix = _cdiv(R, tile_rows)
        else:
            tile_rows, tiles_per_matrix = (ROWS // max(R, 1)) * R, 1
        return dict(numel=n, rows=max(R, 1), columns=C, factored=1, row_stride=p.stride(-2),
                    column_stride=p.stride(-1), split=int(split), tile_rows=tile_rows,
                    tiles_per_matrix=tiles_per_matrix, view_rows=matrices * R, matrices=matrices,
                    tile_matrices=1 if split else ROWS // max(R, 1), global_rows=R,
                    global_numel=n, holds_columns=1, **self._batch_fields(dims))

    def _batch_fields(self, dims: list) -> dict:
        self.batch_dims = max(self.batch_dims, len(dims))
        dims = dims + [(1, 0)] * (kernels.MAX_BATCH_DIMS - len(dims))
        return {**{f"batch_size_{d}": size for d, (size, _) in enumerate(dims)},
                **{f"batch_stride_{d}": stride for d, (_, stride) in enumerate(dims)}}

    def _schedule(self) -> tuple:
        return self.tile_tensor, self.tile_row, self.meta, self.offsets, self.n_blocks, self.n_tensors

    def matches(self, roles: list[list[torch.Tensor]]) -> bool:
        """Same shapes and strides (the tiles still fit); addresses may have changed."""
        return tuple((p.shape, p.stride()) for p in roles[0]) == self.layout

    def shard(self, params) -> None:
        """The whole tensors behind the local ones the plan walks (``params``: the launch's
        parameters as given, DTensors under FSDP2; plain tensors are whole): each tensor's rows
        and elements in all (the means' and RMS's divisors), and the tensors whose rows are
        sharded over ranks (``Shard`` of the dim before the last): their column and matrix sums,
        first in the scratch, are summed over those ranks (``row_groups``) between the first
        and second launch. Columns may not be sharded: a row's mean would need every rank."""
        table = self._local_table.clone()
        field = kernels.META.index
        shared, layouts = [], set()
        for t, p in enumerate(params):
            if not is_dtensor(p):
                continue
            table[t, field("global_numel")] = p.numel()
            if p.dim() < 2:
                continue
            sharded = [(mesh_dim, placement.dim) for mesh_dim, placement in enumerate(p.placements)
                       if placement.is_shard()]
            if any(dim == p.dim() - 1 for _, dim in sharded):
                raise NotImplementedError(f"Adafactor: a parameter of shape {tuple(p.shape)} is sharded along its "
                                          f"last dim ({p.placements}); its row statistics need whole rows on each rank")
            table[t, field("global_rows")] = p.shape[-2]
            rows_sharded = tuple(mesh_dim for mesh_dim, dim in sharded if dim == p.dim() - 2)
            if rows_sharded:
                shared.append(t)
                layouts.add((p.device_mesh, rows_sharded))
        if len(layouts) > 1:
            raise RuntimeError("Adafactor: the parameters of a group whose rows are sharded must share a mesh and "
                               "the mesh dims they are sharded over (FSDP2 shards them so)")
        bases = [0, 0]  # (the next column and matrix sum)

        def place(t):
            table[t, field("column_base")], table[t, field("matrix_base")] = bases
            bases[0] += int(table[t, field("matrices")] * table[t, field("columns")])
            bases[1] += int(table[t, field("matrices")])

        for t in shared:  # the summed ones first, then the others
            place(t)
        self.shared = tuple(bases)
        for t in range(self.n_tensors):
            if table[t, field("factored")] and t not in shared:
                place(t)
        self.meta.copy_(table)
        self.row_groups = ()
        if layouts:
            mesh, dims = layouts.pop()
            self.row_groups = tuple(mesh.get_group(dim) for dim in dims)

    def launch(self, algorithm, hyperparameters: tuple, flags, lr: float, lr_ptr, step_args, epoch,
               sum_groups: tuple) -> None:
        """One step: the algorithm's three kernels (``_launch.launch_step``'s arguments), the
        sharded rows' column statistics summed over their ranks after the first, the norms over
        the ranks sharing the tensors after the second."""
        sums, sum_partials = self.sum_buffers(len(algorithm.sums))
        args = (*self.schedule, *self.bases, self.counter, self.column_sums, self.matrix_sums, self.partials, sums,
                sum_partials, lr, lr_ptr, *hyperparameters, step_args.grad_scale, step_args.found_inf,
                step_args.seed, epoch)
        constexprs = dict(FLAGS=flags, LR_ON_DEVICE=lr_ptr is not None, HAS_FOUND_INF=step_args.found_inf is not None,
                          COUNT_EPOCH=epoch is not None, VEC=self.vec if self.aligned and self.multiples_of_vec else 1,
                          BATCH_DIMS=self.batch_dims, ROWS=self.rows, COLS=self.cols)
        statistics, norms, update = (_FLOAT64[kernel] if self.float64 else kernel for kernel in algorithm.tiles)
        _launch.launch(statistics, self.grid, args, constexprs, self.num_warps, persistent=True)
        columns, matrices = self.shared
        for group in self.row_groups:
            torch.distributed.all_reduce(self.column_sums[:columns], group=group)
            torch.distributed.all_reduce(self.matrix_sums[:matrices], group=group)
        _launch.launch(norms, self.grid, args, constexprs, self.num_warps, persistent=True)
        for group in sum_groups:
            torch.distributed.all_reduce(sums, group=group)
        _launch.launch(update, self.grid, args, constexprs, self.num_warps, persistent=True)
