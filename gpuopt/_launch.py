"""Kernel launches without Triton's per-call argument binding.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run``, which binds and
specialises every argument on every call (~10 µs for the optimizers' ~26 arguments) before the
C launcher runs. A step launches the same kernel with the same kinds of arguments every time, so
``launch`` keeps the compiled kernel and its launcher per *specialisation key* and calls it with
the argument list directly. The key holds everything Triton may compile differently for, and
more (a superset is safe, a subset is not):

* every constexpr, ``num_warps`` and the grid;
* each tensor argument's dtype and whether its address is a multiple of 16 bytes (Triton
  specialises pointers on that alignment);
* each int's and bool's exact value (Triton specialises ints on ``== 1`` and divisibility by 16,
  and on the width they need), ``None``s (constexpr in Triton), and each other argument's type
  (floats are never specialised on their value);
* the current CUDA device (Triton compiles and loads per device).

A miss asks Triton for the compiled kernel (``JITFunction.run`` with ``warmup=True``: it compiles
or finds it, and launches nothing), keeps the compiled kernel's own launcher, and launches
through it; a persistent launch's grid is fitted to the compiled kernel's occupancy there (one
wave, see ``launch``). Through the interpreter (CPU) every launch takes Triton's path: there is
no compiled kernel to keep.

A site that launches with arguments of the same kinds every time (a batch-norm layer's passes)
skips even the key: a ``Launch`` keeps the launcher its first call found, with the arguments'
constant tail (see ``Launch``).
"""

from __future__ import annotations

import threading

import torch

from ._runtime import interpreter_enabled, multiprocessor, resident_programs
from .kernels import _multi_tensor as walk

def _argument_key(args: tuple) -> tuple:
    """What Triton may specialise ``args`` on (see the module's docstring): each tensor's dtype
    and 16-byte alignment, each int's and bool's value, every other argument's class (a float is
    never specialised on its value; ``None`` is a constexpr)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                  else a if type(a) is int else (bool, a) if type(a) is bool else type(a) for a in args])


_kept: dict = {}  # kernel → (names of its constexprs in signature order, {key: launcher})
_MAX_KEPT = 64  # launchers per kernel; more means some int argument changes every call
_compiled_launches = not interpreter_enabled()  # the bench's host suite turns this on with stubs
_interpreter_lock = threading.Lock()  # one interpreted launch at a time, whichever thread makes it


def _current_device() -> int:
    return torch.cuda.current_device()


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int, *, persistent: bool = False):
    """``kernel[grid](*args, **constexprs, num_warps=num_warps)``: ``args`` are the kernel's
    runtime arguments in signature order, ``constexprs`` the rest by name. Returns the kept
    ``(launcher, constexpr values)`` it launched through, or None (Triton's own path).

    ``persistent``: the kernel walks its work grid-stride along axis 0 (any number of programs
    does all of it), and ``grid[0]`` is an upper bound, lowered to one *wave* of the compiled
    kernel: as many programs as every SM keeps resident at once, from the kernel's registers,
    warps and shared memory (``_runtime.resident_programs``). A grid just over a whole number of
    waves would leave most SMs idle while the last few programs run."""
    if not _compiled_launches:
        with _interpreter_lock:  # Triton's interpreter keeps the running grid's state in globals
            kernel[grid](*args, **constexprs, num_warps=num_warps)
        return None
    kept = _kept.get(kernel)
    if kept is None:
        kept = _kept[kernel] = (tuple(kernel.arg_names[len(args):]), {})
    names, launchers = kept
    values = tuple(map(constexprs.__getitem__, names))
    key = (_current_device(), grid, num_warps, values, _argument_key(args))
    runner = launchers.get(key)
    if runner is None:
        compiled = kernel.run(*args, grid=grid, warmup=True, **constexprs, num_warps=num_warps)  # compiles only
        if compiled is None or not hasattr(compiled, "function") or hasattr(compiled, "result"):
            kernel[grid](*args, **constexprs, num_warps=num_warps)  # not a kernel to keep: Triton's own path
            return None
        if persistent:
            grid = (min(grid[0], one_wave(compiled, num_warps) or grid[0]), *grid[1:])
        if len(launchers) >= _MAX_KEPT:
            launchers.clear()
        # CompiledKernel's own launcher (stream, hooks, then the C launch) takes a 3-D grid.
        runner = launchers[key] = compiled[(*grid, 1, 1)[:3]]
    runner(*args, *values)
    return runner, values


class Launch:
    """One launch site with its kernel, grid, constexprs, warps and trailing runtime arguments
    (``fixed``: the ones every call passes alike, e.g. the view's sizes) resolved once: a batch-norm
    layer's passes (``_batch_norm_launch.Layer``), whose calls pass arguments of the same kinds
    every time (the layer's own tensors, fresh scratch; a module's plan checks the rest).

    ``site(kept, *head)`` launches with the runtime arguments ``(*head, *fixed)``. ``kept`` is the
    caller's promise that they have the kinds they had at this site's first kept call — each
    tensor's dtype and 16-byte alignment, each int's value, the same arguments None — on the same
    current device (checked here). Kept calls after the first skip ``launch``'s key and
    dictionaries and call the compiled launcher with one prepared tail of arguments (~0.3 µs
    instead of ~3); ``kept=False`` (e.g. a gradient of unknown alignment) is ``launch`` itself."""

    __slots__ = ("kernel", "grid", "constexprs", "num_warps", "fixed", "_kept")

    def __init__(self, kernel, grid: tuple, constexprs: dict, num_warps: int, fixed: tuple = ()):
        self.kernel, self.grid, self.constexprs, self.num_warps, self.fixed = kernel, grid, constexprs, num_warps, fixed
        self._kept = None  # (launcher, tail of arguments, device): one attribute, replaced whole

    def __call__(self, kept: bool, *head) -> None:
        found = self._kept
        if kept and found is not None and found[2] == _current_device():
            found[0](*head, *found[1])
            return
        found = launch(self.kernel, self.grid, (*head, *self.fixed), self.constexprs, self.num_warps)
        if kept and found is not None:
            self._kept = (found[0], (*self.fixed, *found[1]), _current_device())


def aligned16(*tensors) -> bool:
    """Whether every tensor given (None: skipped) starts on a 16-byte boundary: those torch just
    allocated are (64 bytes on the CPU, 512 on CUDA; a pluggable allocator may differ), and a kept
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
                  found_inf=None, seed=0, epoch=None, has_step=False) -> None:
    """``algorithm``'s update (a ``kernels._multi_tensor.Algorithm``) over every tensor of
    ``plan``, through the shared walk (``_step_kernel``, or its float64 variant for float64
    tensors). ``hyperparameters``: the update's floats; ``flags``: its constexpr namedtuple;
    ``lr_ptr``: a device tensor the kernel reads ``lr`` from (capturable steps), else ``lr`` by
    value; ``epoch``: the stochastic-rounding epoch (an int32 device tensor the kernel reads
    into the noise and advances; None: 0); ``has_step``: the ``step`` role (index 2) is read
    and advanced.

    ``RUN``: with fp32 master weights beside 16-bit tensors, every access is 4 elements per
    thread. Left alone, Triton gives the 16-bit accesses 8 per thread (16 bytes) but caps each
    fp32 store at 4 (16 bytes), and converts the master's new value between the two layouts
    through shared memory: 4 barriers per iteration (compile report). With 4 throughout the fp32
    streams keep 16-byte accesses, the 16-bit ones take 8-byte ones, and no conversion is left."""
    bases = plan.bases()
    n_roles, n_hyper = len(bases), len(hyperparameters)
    launch(walk._step_f64_kernel if plan.float64 else walk._step_kernel, plan.grid,
           (*plan.schedule_args(), *bases, *(bases[0],) * (walk.MAX_ROLES - n_roles), plan.counter, lr, lr_ptr,
            *hyperparameters, *(0.0,) * (walk.MAX_HYPER - n_hyper), grad_scale, found_inf, seed, epoch),
           dict(UPDATE=algorithm.update, PER_TENSOR=algorithm.per_tensor or walk.step_only, FLAGS=flags,
                N_ROLES=n_roles, N_HYPER=n_hyper, HAS_STEP=has_step,
                COUNT_EPOCH=epoch is not None,
                LR_ON_DEVICE=lr_ptr is not None,
                HAS_FOUND_INF=found_inf is not None, ALIGNED=plan.aligned, BLOCK=plan.block,
                RUN=4 if getattr(flags, "has_master", False) else 0),
           plan.num_warps, persistent=True)


def launch_step(algorithm, plan, step_args, lr, hyperparameters: tuple, flags: dict, *, has_master,
                stochastic_rounding, has_step) -> None:
    """One optimizer step over ``plan``: ``launch_update`` with the step's shared arguments
    (``step_args``: AMP's tensors, the rounding seed and epoch; ``lr``) and ``flags`` completed with the ones every
    optimizer update reads (``COMMON_FLAGS``; ``flags`` brings ``maximize``)."""
    lr_value, lr_ptr = step_args.lr_args(lr)
    launch_update(algorithm, plan, hyperparameters,
                  algorithm.flags(**flags, has_grad_scale=step_args.has_grad_scale, has_master=has_master,
                                  stochastic_rounding=stochastic_rounding),
                  lr=lr_value, lr_ptr=lr_ptr, grad_scale=step_args.grad_scale, found_inf=step_args.found_inf,
                  seed=step_args.seed, epoch=step_args.epoch if stochastic_rounding else None, has_step=has_step)
