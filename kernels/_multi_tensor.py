"""Shared device helpers for kernels that update a whole list of tensors in one launch.

A launch covers one *group* of tensors. Each tensor plays several *roles* (param, grad, exp_avg,
...). The host (``gpuopt._multi_tensor.LaunchPlan``) gives every kernel:

* a **block schedule**: for schedule entry ``i``, the tensor index ``block_tensor[i]`` (int32) and
  the first element ``block_start[i]`` (int64) of a ``BLOCK``-element slice of that tensor;
* ``numel[t]`` (int64) for every tensor ``t``;
* per role, a **typed base pointer** (the role's first tensor) and, in one int64 table
  ``offsets[role, t]``, each tensor's distance from that base in elements.

Why base + offset and not a table of raw addresses: an address loaded from memory and cast to a
pointer carries no alignment information, so the compiler emits scalar loads. A kernel argument
is specialised as 16-byte aligned and ``tl.multiple_of`` on the offset keeps that known, so full
blocks compile to 16-byte vector loads and stores (checked in the PTX: ``ld.global.v4``).

Why full and tail blocks are separate calls: a mask built from a ``numel`` loaded at run time has
no known constancy, which also forces scalar accesses; a full block needs no mask at all.

Programs walk the schedule grid-stride (``i = pid, pid + num_programs, ...``), so the grid can be
sized to the machine rather than to the model.
"""

import triton
import triton.language as tl


@triton.jit
def schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK: tl.constexpr):
    """Schedule entry ``i`` → (tensor index, element offsets of the block, is it full, numel)."""
    t = tl.load(block_tensor_ptr + i)
    start = tl.multiple_of(tl.load(block_start_ptr + i), BLOCK)  # int64: tensors > 2^31 elements
    numel = tl.load(numel_ptr + t)
    offsets = start + tl.arange(0, BLOCK)
    return t, offsets, start + BLOCK <= numel, numel


@triton.jit
def tensor_ptr(base_ptr, offsets_ptr, role: tl.constexpr, t, n_tensors, ALIGNED: tl.constexpr):
    """Pointer to element 0 of tensor ``t`` in role ``role``: the role's base pointer plus the
    tensor's element offset. ``ALIGNED``: every address in the launch is 16-byte aligned."""
    off = tl.load(offsets_ptr + role * n_tensors + t)
    if ALIGNED:
        off = tl.multiple_of(off, 128 // base_ptr.dtype.element_ty.primitive_bitwidth)
    return base_ptr + off


@triton.jit
def load_f32(ptr, mask):
    """Load in the storage dtype, compute in fp32 (``mask=None`` for a full block)."""
    return tl.load(ptr, mask=mask).to(tl.float32)


@triton.jit
def store_as(ptr, value, mask):
    """Round ``value`` to the storage dtype of ``ptr`` (round to nearest even) and store it."""
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def stochastic_round_bf16(x, seed, offsets):
    """Round fp32 ``x`` to bf16 stochastically: up with probability equal to the discarded
    fraction, so ``E[round(x)] = x``. Adding a uniform 16-bit integer to the low half of the fp32
    bit pattern and truncating does exactly that (inf stays inf, NaN stays NaN)."""
    noise = tl.randint(seed, offsets.to(tl.int32)) & 0xFFFF
    bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are zero
