"""The total norm of many gradients (``torch.nn.utils.clip_grad_norm_``'s), in one launch per
(device, dtype):

    ‖g‖_p = (Σ_tensors Σ_i |g_i|^p)^(1/p)          ‖g‖_∞ = max_tensors max_i |g_i|

Each program walks blocks of the multi-tensor schedule grid-stride (``gpuopt/kernels/_multi_tensor.py``)
and writes one partial — Σ|g|^p, or max|g|, of the blocks it saw — accumulated in fp32 (fp64 for
fp64 gradients); the host (``gpuopt.clip``) launches it, ``plan.grid[0]`` zeros of partials (a GPU
runs fewer programs, one wave, and leaves the rest 0), and folds them with one torch reduction
(and, for sharded gradients, one all-reduce). Bytes per element: the gradient, read once.
"""

import triton
import triton.language as tl

from ._multi_tensor import load_compute, schedule_entry, tensor_ptr

# What the partials hold: Σ|g|², Σ|g|, Σ|g|^p, max|g|.
SQUARES, ABSOLUTES, POWERS, MAXIMUM = (tl.constexpr(i) for i in range(4))


@triton.jit
def _nan_maximum(a, b):
    """max that keeps a NaN (tl.max drops it, as the hardware's max does)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def norm_partials_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors, grad_ptr,
                          partials_ptr, power, KIND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``partials[program] = Σ f(|g|)`` (or ``max |g|``) over the blocks this program walks, with
    f = x², x, x^power for ``KIND`` SQUARES, ABSOLUTES, POWERS. A NaN anywhere makes the partial
    NaN, as it makes torch's norm NaN."""
    total = tl.zeros([BLOCK], tl.float64 if grad_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
        ptr = tensor_ptr(grad_ptr, offsets_ptr, 0, t, n_tensors, ALIGNED) + offsets
        if full:
            magnitude = tl.abs(load_compute(ptr, None))
        else:  # masked lanes read 0: they add nothing to a sum and lose every max
            magnitude = tl.abs(tl.where(offsets < numel, load_compute(ptr, offsets < numel), 0.0))
        if KIND == MAXIMUM:
            total = tl.maximum(total, magnitude, propagate_nan=tl.PropagateNan.ALL)
        elif KIND == SQUARES:
            total += magnitude * magnitude
        elif KIND == ABSOLUTES:
            total += magnitude
        else:  # |g|^p as 2^(p·log2|g|), p > 0 (and 0 for g = 0, without taking log2 0)
            positive = magnitude > 0.0
            total += tl.where(positive, tl.exp2(power * tl.log2(tl.where(positive, magnitude, 1.0))), 0.0)
    if KIND == MAXIMUM:
        tl.store(partials_ptr + tl.program_id(0), tl.reduce(total, 0, _nan_maximum))
    else:
        tl.store(partials_ptr + tl.program_id(0), tl.sum(total, 0))
