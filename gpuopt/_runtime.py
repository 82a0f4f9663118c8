"""Where kernels can run, and the checks that say so before any kernel launches."""

import functools
import os
from dataclasses import dataclass

import torch


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_kernel_device(tensor: torch.Tensor, what: str) -> None:
    """Raise a clear error if Triton kernels cannot run on ``tensor``'s device."""
    kind = tensor.device.type
    if kind == "cuda":
        return
    if kind == "cpu":
        if interpreter_enabled():
            return
        raise RuntimeError(
            f"gpuopt: {what} is on the CPU, where gpuopt's Triton kernels cannot run. Move the "
            "model to a CUDA GPU (model.cuda()), or set TRITON_INTERPRET=1 before triton is "
            "imported to run the kernels (slowly) through Triton's interpreter."
        )
    raise RuntimeError(f"gpuopt: {what} is on device '{tensor.device}'; gpuopt runs on CUDA GPUs "
                       "(or on the CPU through Triton's interpreter).")


def use_gpu_config(device: torch.device) -> bool:
    """Launch with the block sizes and grids of a GPU: on a GPU, or in the interpreter when
    ``GPUOPT_GPU_CONFIG=1`` (the tests check the GPU's configurations on the CPU that way, and
    bench/compile_report.py records the launches a GPU would make)."""
    return device.type == "cuda" or os.environ.get("GPUOPT_GPU_CONFIG") == "1"


# What GPUOPT_GPU_CONFIG=1 pretends to run on when there is no GPU: an H100 SXM.
ASSUMED_SM_COUNT, ASSUMED_THREADS_PER_SM = 132, 2048


@dataclass(frozen=True)
class Multiprocessor:
    """What one SM holds at once, the limits of how many programs (CTAs) are resident on it."""

    registers: int = 65536
    threads: int = 2048
    shared: int = 233472  # bytes (228 KB)
    blocks: int = 32
    count: int = ASSUMED_SM_COUNT  # SMs on the device


H100 = Multiprocessor()


@functools.lru_cache(maxsize=16)
def multiprocessor(device_index: int) -> Multiprocessor:
    """The SM limits of a CUDA device (H100's where torch does not report one)."""
    props = torch.cuda.get_device_properties(device_index)
    return Multiprocessor(getattr(props, "regs_per_multiprocessor", H100.registers),
                          getattr(props, "max_threads_per_multi_processor", H100.threads),
                          getattr(props, "shared_memory_per_multiprocessor", H100.shared),
                          H100.blocks, props.multi_processor_count)


def resident_programs(registers: int, num_warps: int, shared: int, sm: Multiprocessor = H100) -> int:
    """Programs of a compiled kernel resident on one SM at once: the least that its registers
    (allocated per warp in units of 256: a warp holds ceil(32·regs / 256)·256), its warps, its
    shared memory and the SM's block slots allow. A grid of ``resident × SMs`` programs is one
    *wave*; a grid a little over a whole number of waves leaves most SMs idle for its last."""
    per_warp = -(-32 * max(registers, 1) // 256) * 256
    by_registers = (sm.registers // per_warp) // num_warps
    by_shared = sm.shared // shared if shared else sm.blocks
    return max(1, min(sm.blocks, sm.threads // (32 * num_warps), by_registers, by_shared))
