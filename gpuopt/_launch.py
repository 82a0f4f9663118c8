"""Where kernels run (the device checks, the SM limits a grid is sized from) and how they are
launched: without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run``, which binds and
specialises every argument on every call before the C launcher runs (its cost: bench/NOTES.md).
A step launches the same kernel with the same kinds of arguments every time, so ``launch``
caches the compiled kernel's launcher per *specialisation key* and calls it with the argument
list directly. The key holds everything Triton may compile differently for, and
more (a superset is safe, a subset is not):

* every constexpr, ``num_warps`` and the grid;
* each tensor argument's dtype and whether its address is a multiple of 16 bytes (Triton
  specialises pointers on that alignment);
* each int's and bool's exact value (Triton specialises ints on ``== 1`` and divisibility by 16,
  and on the width they need), ``None``s (constexpr in Triton), and each other argument's type
  (floats are never specialised on their value);
* the current CUDA device (Triton compiles and loads per device).

A miss asks Triton for the compiled kernel (``JITFunction.run`` with ``warmup=True``: it compiles
or finds it, and launches nothing), caches the compiled kernel's own launcher, and launches
through it; a persistent launch's grid is fitted to the compiled kernel's occupancy there (one
wave, see ``launch``). Through the interpreter (CPU) every launch takes Triton's path: there is
no compiled kernel to cache. (``_compiled_launches`` says which; the host bench turns it on
with stubbed kernels: bench/host_suite.py, the one seam it patches.)

A site that launches with arguments of the same kinds every time (a batch-norm call's passes)
skips even the key: a ``Launch`` caches the launcher its first call found, with the arguments'
constant tail (see ``Launch``).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .kernels import _multi_tensor as multi_tensor

# ---------------------------------------------------------------- where kernels run ----------

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


# -------------------------------------------------------------------------- launches ----------

def _argument_key(args: tuple) -> tuple:
    """What Triton may specialise ``args`` on (see the module's docstring): each tensor's dtype
    and 16-byte alignment, each int's and bool's value, every other argument's class (a float is
    never specialised on its value; ``None`` is a constexpr)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                  else a if type(a) is int else (bool, a) if type(a) is bool else type(a) for a in args])


_launchers: dict = {}  # kernel → (names of its constexprs in signature order, {key: launcher})
_MAX_LAUNCHERS = 64  # per kernel; more means some int argument changes every call
_compiled_launches = not interpreter_enabled()  # the bench's host suite turns this on with stubs
_interpreter_lock = threading.Lock()  # one interpreted launch at a time, whichever thread makes it


def _current_device() -> int:
    return torch.cuda.current_device()


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int, *, persistent: bool = False):
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``: ``args`` are the kernel's
    runtime arguments in signature order, ``constexprs`` the rest by name. Returns the cached
    ``(launcher, constexpr values)`` it launched through, or None (Triton's own path).

    ``persistent``: the kernel walks its work grid-stride along axis 0 (any number of programs
    does all of it), and ``grid[0]`` is an upper bound, lowered to one *wave* of the compiled
    kernel: as many programs as every SM keeps resident at once, from the kernel's registers,
    warps and shared memory (``resident_programs``). A grid just over a whole number of
    waves would leave most SMs idle while the last few programs run."""
    if not _compiled_launches:
        with _interpreter_lock:  # Triton's interpreter keeps the running grid's state in globals
            kernel[grid](*args, **constexprs, num_warps=num_warps)
        return None
    entry = _launchers.get(kernel)
    if entry is None:
        entry = _launchers[kernel] = (tuple(kernel.arg_names[len(args):]), {})
    names, launchers = entry  # (the constexprs' names in signature order, {key: launcher})
    values = tuple(map(constexprs.__getitem__, names))
    key = (_current_device(), grid, num_warps, values, _argument_key(args))
    runner = launchers.get(key)
    if runner is None:
        compiled = kernel.run(*args, grid=grid, warmup=True, **constexprs, num_warps=num_warps)  # compiles only
        if compiled is None or not hasattr(compiled, "function") or hasattr(compiled, "result"):
            kernel[grid](*args, **constexprs, num_warps=num_warps)  # not a kernel to cache: Triton's own path
            return None
        if persistent:
            grid = (min(grid[0], one_wave(compiled, num_warps) or grid[0]), *grid[1:])
        if len(launchers) >= _MAX_LAUNCHERS:
            launchers.clear()
        # CompiledKernel's own launcher (stream, hooks, then the C launch) takes a 3-D grid.
        runner = launchers[key] = compiled[(*grid, 1, 1)[:3]]
    runner(*args, *values)
    return runner, values


class _CachedLaunch(NamedTuple):
    """A ``Launch`` site's cached launcher and the arguments every call appends (its fixed runtime
    arguments, then its constexprs' values), for the device it was found on."""

    launcher: object
    tail: tuple
    device: int


class Launch:
    """One launch site with its kernel, grid, constexprs, warps and trailing runtime arguments
    (``fixed``: the ones every call passes alike, e.g. the view's sizes) resolved once: a batch-norm
    layer's passes (``_batch_norm_launch.Passes``), whose calls pass arguments of the same kinds
    every time (the layer's own tensors, fresh scratch; a module's plan checks the rest).

    ``site(cacheable, *head)`` launches with the runtime arguments ``(*head, *fixed)``.
    ``cacheable`` is the caller's promise that they have the kinds they had at this site's first
    cacheable call — each tensor's dtype and 16-byte alignment, each int's value, the same
    arguments None — on the same current device (checked here). Such calls after the first skip
    ``launch``'s key and dictionaries and call the cached launcher with one prepared tail of
    arguments; ``cacheable=False`` (e.g. a gradient of unknown alignment) is ``launch`` itself."""

    __slots__ = ("kernel", "grid", "constexprs", "num_warps", "fixed", "_cached")

    def __init__(self, kernel, grid: tuple, constexprs: dict, num_warps: int, fixed: tuple = ()):
        self.kernel, self.grid, self.constexprs, self.num_warps, self.fixed = kernel, grid, constexprs, num_warps, fixed
        self._cached = None  # a _CachedLaunch: one attribute, replaced whole

    def __call__(self, cacheable: bool, *head) -> None:
        cached = self._cached
        if cacheable and cached is not None and cached.device == _current_device():
            cached.launcher(*head, *cached.tail)
            return
        found = launch(self.kernel, self.grid, (*head, *self.fixed), self.constexprs, self.num_warps)
        if cacheable and found is not None:
            launcher, constexpr_values = found
            self._cached = _CachedLaunch(launcher, (*self.fixed, *constexpr_values), _current_device())


def aligned16(*tensors) -> bool:
    """Whether every tensor given (None: skipped) starts on a 16-byte boundary: those torch just
    allocated are (64 bytes on the CPU, 512 on CUDA; a pluggable allocator may differ), and a cached
    launch (``Launch``) is specialised on it."""
    address = 0
    for t in tensors:
        if t is not None:
            address |= t.data_ptr()
    return address % 16 == 0


def one_wave(compiled, num_warps: int) -> int | None:
    """Programs of ``compiled`` (a loaded CompiledKernel) resident on the whole current device at
    once; None when the kernel does not say its registers (a stand-in)."""
    registers = getattr(compiled, "n_regs", None)
    if not registers:
        return None
    sm = multiprocessor(_current_device())
    return sm.count * resident_programs(registers, num_warps, compiled.metadata.shared, sm)


def resident_per_sm(kernel, args: tuple, constexprs: dict, num_warps: int) -> int | None:
    """Programs of ``kernel`` compiled for these arguments (tensors, or their dtypes) resident on
    one SM of the current device; None through the interpreter. Compiles, launches nothing."""
    if not _compiled_launches:
        return None
    compiled = kernel.warmup(*args, grid=(1,), **constexprs, num_warps=num_warps)
    if compiled is None or not hasattr(compiled, "function") or hasattr(compiled, "result"):
        return None
    compiled[(1, 1, 1)]  # loads it: the driver reports its registers
    wave = one_wave(compiled, num_warps)
    return wave and wave // multiprocessor(_current_device()).count


def launch_update(algorithm, plan, hyperparameters: tuple, flags, *, lr=0.0, lr_ptr=None, grad_scale=None,
                  found_inf=None, seed=0, epoch=None, has_step=False, norms=False) -> None:
    """``algorithm``'s update (a ``kernels._multi_tensor.Algorithm``) over every tensor of
    ``plan``, through the shared walk (``_step_kernel``, or its float64 variant for float64
    tensors). ``hyperparameters``: the update's floats; ``flags``: its constexpr namedtuple;
    ``lr_ptr``: a device tensor the kernel reads ``lr`` from (capturable steps), else ``lr`` by
    value; ``epoch``: the stochastic-rounding epoch (an int32 device tensor the kernel reads
    into the noise and advances; None: 0); ``has_step``: the ``step`` role (index 2) is read
    and advanced; ``norms``: the launch of ``algorithm.norms`` (its whole-tensor sums into the
    plan's ``sum_buffers``), else of ``algorithm.update`` (reading them, if it has any).

    ``RUN``: with elements of different sizes in one launch (fp32 master weights beside bf16
    parameters, Muon's bf16 update beside fp32 gradients), every access is 4 elements per
    thread. Left alone, Triton gives the 16-bit accesses 8 per thread (16 bytes) but caps each
    fp32 access at 4 (16 bytes), and converts values between the two layouts through shared
    memory: 4 barriers per iteration (compile report). With 4 throughout the fp32 streams keep
    16-byte accesses, the 16-bit ones take 8-byte ones, and no conversion is left. (A float64
    plan takes 2: two float64 are its 16-byte access; Muon's float64 momentum had 4 barriers at 4.)"""
    bases = plan.bases
    n_roles, n_hyper, n_sums = len(bases), len(hyperparameters), len(algorithm.sums)
    sums, partials = plan.sum_buffers(n_sums) if n_sums else (None, None)
    launch(multi_tensor._step_f64_kernel if plan.float64 else multi_tensor._step_kernel, plan.grid,
           (*plan.schedule, *bases, *(bases[0],) * (multi_tensor.MAX_ROLES - n_roles), plan.counter, lr, lr_ptr,
            *hyperparameters, *(0.0,) * (multi_tensor.MAX_HYPER - n_hyper), grad_scale, found_inf, seed, epoch,
            sums, partials),
           dict(UPDATE=algorithm.norms if norms else algorithm.update,
                PER_TENSOR=algorithm.per_tensor or multi_tensor.step_only, FLAGS=flags,
                N_ROLES=n_roles, N_HYPER=n_hyper, HAS_STEP=has_step,
                COUNT_EPOCH=epoch is not None, MAKE_SUMS=n_sums if norms else 0, TAKE_SUMS=0 if norms else n_sums,
                LR_ON_DEVICE=lr_ptr is not None,
                HAS_FOUND_INF=found_inf is not None, ALIGNED=plan.aligned, BLOCK=plan.block,
                RUN=(2 if plan.float64 else 4) if getattr(flags, "has_master", False) or plan.mixed_widths else 0),
           plan.num_warps, persistent=True)


@dataclass(frozen=True)
class StepOptions:
    """An optimizer's launch arguments worked out from its options (``_step.step_options``)."""

    hyperparameters: tuple  # the floats ``update`` reads, in the order of ``Algorithm.hyper``
    flags: dict  # the algorithm's own constexpr flags by name (``maximize`` included)
    has_step: bool  # the ``step`` role is read and advanced


def launch_step(algorithm, bucket, options: StepOptions, step_args, lr) -> None:
    """One optimizer step over ``bucket`` (a ``_step.Bucket``, its plan pointed at this step's
    tensors): ``launch_update`` with the step's shared arguments (``step_args``: AMP's tensors,
    the rounding seed and epoch) and the flags every optimizer update reads (``COMMON_FLAGS``)
    completed. A tensor ``lr`` on the parameters' device is read by the kernel; a float or a CPU
    tensor (reading it does not synchronise) is passed by value, as a float64 argument. An
    algorithm with kernels of its own (``Algorithm.tiles``) is launched by its plan
    (``gpuopt._adafactor.TilePlan.launch``) with the same arguments."""
    on_device = isinstance(lr, torch.Tensor) and lr.device == step_args.device
    rounded = bucket.stochastic_rounding
    flags = algorithm.flags(**options.flags, has_grad_scale=step_args.grad_scale is not None,
                            has_master=bucket.has_master, stochastic_rounding=rounded)
    lr_value, lr_ptr = (0.0, lr) if on_device else (float(lr), None)
    if algorithm.tiles:
        bucket.plan.launch(algorithm, options.hyperparameters, flags, lr_value, lr_ptr, step_args,
                           step_args.epoch if rounded else None, bucket.sum_groups)
        return
    if algorithm.norms is not None:  # the whole-tensor sums first, summed over the shards' ranks
        launch_update(algorithm, bucket.plan, options.hyperparameters, flags, lr=lr_value, lr_ptr=lr_ptr,
                      grad_scale=step_args.grad_scale, found_inf=step_args.found_inf, has_step=options.has_step,
                      norms=True)
        for group in bucket.sum_groups:
            torch.distributed.all_reduce(bucket.plan.sum_buffers(len(algorithm.sums))[0], group=group)
    launch_update(algorithm, bucket.plan, options.hyperparameters, flags, lr=lr_value, lr_ptr=lr_ptr,
                  grad_scale=step_args.grad_scale, found_inf=step_args.found_inf, seed=step_args.seed,
                  epoch=step_args.epoch if rounded else None, has_step=options.has_step)
