"""Where kernels can run, and the checks that say so before any kernel launches."""

import os

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
