"""Muon's orthogonalization, host side: the Newton–Schulz iteration of ``torch.optim.Muon``, run
batched over the matrices of one shape, and shared out over the ranks under FSDP2.

Between Muon's two launches (``gpuopt/kernels/muon.py``: the momentum blend, written in bf16 into the
group's ``Orthogonalizer.updates``; then the weight update reading them back) each update matrix
U is replaced by NS(U). The matrices of a group are kept stacked by (shape, strides), so the
iteration is one chain of batched products per shape (``newton_schulz``) rather than one per
tensor. Under FSDP2 (DTensor parameters sharded along their rows, ``Shard(0)``) each rank holds
a slice of every matrix: matrix ``i`` is gathered on rank ``i mod world``, which orthogonalizes its
share (batched by shape), and the results are scattered back (Moonlight's distributed Muon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._distributed import local, shard_groups


def newton_schulz(x: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """``torch.optim.Muon``'s ``_zeropower_via_newtonschulz`` of every matrix of the bf16 batch
    ``x`` ([k, A, B]) at once: a tall matrix is iterated transposed (its Gram matrix is the
    smaller one), each is divided by its Frobenius norm (at least ``eps``), then ``steps`` times
    ``X ← a X + (b G + c G²) X`` with ``G = X Xᵀ``. Returns a new tensor."""
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def lr_scale(shape, adjust_lr_fn) -> float:
    """``torch.optim.Muon``'s ``_adjust_lr`` factor for a parameter of ``shape`` (A, B):
    sqrt(max(1, A/B)) (``None``/"original", Keller Jordan's), or 0.2 sqrt(max(A, B))
    ("match_rms_adamw", Moonshot's: the update's RMS of AdamW's)."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / columns))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return 1.0


@dataclass
class _Batch:
    stacked: torch.Tensor  # [k, A, B] bf16: matrix j is update ``indices[j]``
    indices: list


class Orthogonalizer:
    """One param group's update matrices (bf16, each laid out as its parameter's local tensor,
    stacked by shape and strides), their learning-rate scales (one float32 per parameter, a
    kernel role), and the work between the launches: ``orthogonalize_``."""

    def __init__(self, name: str, params, adjust_lr_fn, masters=None):
        self.params = list(params)
        for p in self.params:
            if p.ndim != 2:
                raise ValueError(f"{name} only supports 2D parameters whereas we found a parameter with size: "
                                 f"{p.size()}")
        locals_ = [local(p) for p in self.params]
        device = locals_[0].device
        self.updates = [None] * len(locals_)
        self.batches = []
        by_layout: dict = {}
        for i, t in enumerate(locals_):
            by_layout.setdefault((tuple(t.shape), t.stride()), []).append(i)
        for (shape, strides), indices in by_layout.items():
            stacked = torch.empty_strided((len(indices), *shape), (math.prod(shape), *strides), dtype=torch.bfloat16,
                                          device=device)
            for j, i in enumerate(indices):
                self.updates[i] = stacked[j]
            self.batches.append(_Batch(stacked, indices))
        scales = torch.tensor([lr_scale(p.shape, adjust_lr_fn) for p in self.params], dtype=torch.float32)
        self.lr_scales = list(scales.to(device).split(1))
        self.group = _row_shard_group(name, self.params)
        # The weight update's launch (kernels.muon.UPDATE): its roles, and its buckets once planned.
        self.update_roles = dict(param=self.params, orthogonalized=self.updates, lr_scale=self.lr_scales,
                                 master=masters)
        self.update_buckets = None

    def orthogonalize_(self, coefficients, steps: int, eps: float) -> None:
        """Replace every update matrix by its Newton–Schulz orthogonalization."""
        if self.group is None:
            for batch in self.batches:
                batch.stacked.copy_(newton_schulz(batch.stacked, coefficients, steps, eps))
            return
        group, world = self.group, self.group.size()
        rank = dist.get_rank(group)
        owned = {}  # index → its whole matrix, on the rank that orthogonalizes it
        for i, p in enumerate(self.params):
            gathered = [torch.empty(self._padded_shape(i), dtype=torch.bfloat16, device=self.updates[i].device)
                        for _ in range(world)] if i % world == rank else None
            dist.gather(self._padded(i), gathered, dst=dist.get_global_rank(group, i % world), group=group)
            if gathered is not None:
                owned[i] = torch.cat(gathered)[:p.shape[0]]
        results = {}
        by_shape: dict = {}
        for i, matrix in owned.items():
            by_shape.setdefault(tuple(matrix.shape), []).append(i)
        for indices in by_shape.values():  # this rank's share, batched by shape
            done = newton_schulz(torch.stack([owned[i] for i in indices]), coefficients, steps, eps)
            results.update(zip(indices, done))
        for i, p in enumerate(self.params):
            received = torch.empty(self._padded_shape(i), dtype=torch.bfloat16, device=self.updates[i].device)
            pieces = None
            if i in results:
                whole = torch.zeros((world * received.shape[0], p.shape[1]), dtype=torch.bfloat16,
                                    device=received.device)
                whole[:p.shape[0]] = results[i]
                pieces = list(whole.split(received.shape[0]))
            dist.scatter(received, pieces, src=dist.get_global_rank(group, i % world), group=group)
            self.updates[i].copy_(received[:self.updates[i].shape[0]])

    def _padded_shape(self, i) -> tuple:
        rows, columns = self.params[i].shape
        return (-(-rows // self.group.size()), columns)

    def _padded(self, i) -> torch.Tensor:
        """This rank's rows of update ``i``, padded with zeros to the ranks' common chunk."""
        padded = torch.zeros(self._padded_shape(i), dtype=torch.bfloat16, device=self.updates[i].device)
        padded[:self.updates[i].shape[0]] = self.updates[i]
        return padded


def _row_shard_group(name: str, params):
    """The process group over which the parameters are sharded along their rows (FSDP2's
    ``Shard(0)`` on a 1-D mesh, torch.chunk's split: ⌈A / world⌉ rows a rank), or None for plain
    (or replicated) parameters, which are whole on every rank (``_distributed.shard_groups``
    checks that the parameters agree)."""
    groups = shard_groups(name, params)
    if not groups:
        return None
    for p in params:
        mesh = p.device_mesh
        if mesh.ndim != 1 or not p.placements[0].is_shard(0):
            raise RuntimeError(f"{name}: under DTensor it orthogonalizes whole matrices, gathered from row shards: "
                               "every parameter of a group must be sharded along dim 0 of one 1-D mesh (FSDP2's "
                               f"fully_shard), got {p.placements}")
        rows, world, rank = p.shape[0], mesh.size(), mesh.get_local_rank()
        chunk = -(-rows // world)
        if local(p).shape[0] != max(0, min(chunk, rows - rank * chunk)):
            raise RuntimeError(f"{name}: a parameter of {rows} rows holds {local(p).shape[0]} on rank {rank}; "
                               f"expected torch.chunk's split ({chunk} a rank)")
    return groups[0]
