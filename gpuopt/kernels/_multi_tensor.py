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

One kernel, ``_step_kernel``, owns that walk for every algorithm (the optimizers and EMA): an
algorithm is its *update*, a ``@triton.jit`` function passed as the constexpr ``UPDATE`` that
updates one block of one tensor, and optionally the per-tensor scalars it needs, passed as
``PER_TENSOR`` (default ``step_only``)::

    per_tensor(step, lr, hyper, FLAGS) -> scalars (a tuple)
    update(ptrs, offsets, mask, scalars, lr, hyper, grad_scale_ptr, seed, FLAGS)

``ptrs``: a tuple with each role's pointer to this tensor's element 0, in the algorithm's
``ROLES`` order; ``offsets``/``mask``: the block's elements (``mask`` is ``None`` on a full
block); ``step``: this tensor's step number (1 at its first step; 0 for an algorithm without a
``step`` role); ``lr`` and the tuple ``hyper``: the launch's hyperparameters in the compute dtype;
``FLAGS``: the algorithm's constexpr flags (a namedtuple, ``step_flags``). ``per_tensor`` runs
once per block before the full/tail split, so what it computes (Adam's bias corrections) is not
duplicated into both copies of the update (it made the bf16 master-weight Adam spill registers:
bench/NOTES.md).
"""

import collections
import dataclasses
import types
from typing import Callable

import triton
import triton.language as tl


def float64_variant(kernel, names):
    """``kernel`` again, with its float arguments ``names`` declared ``tl.float64``: the launch for
    float64 tensors, whose hyperparameters must arrive exactly (a Python float argument is float32
    to Triton). The float32/bf16 launches keep float32 arguments, which the compiler reads straight
    from the constant bank: declared float64 there, each became a live register after its
    conversion, and the bf16 Adam with master weights spilled."""
    fn = kernel.fn
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__annotations__ = {**fn.__annotations__, **{name: tl.float64 for name in names}}
    clone.__module__, clone.__qualname__, clone.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return triton.jit(clone)


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
def widened(x):
    """``x`` in the compute dtype: float64 stays float64 (a float64 step is float64 end to end, as
    torch's), every other dtype computes in float32."""
    if x.dtype == tl.float64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def load_compute(ptr, mask):
    """Load in the storage dtype, ``widened`` to the compute dtype (``mask=None`` for a full block)."""
    return widened(tl.load(ptr, mask=mask))


@triton.jit
def hyper(value, like_ptr):
    """A hyperparameter in the compute dtype of the tensors at ``like_ptr`` (see ``load_compute``):
    float64 for float64 tensors (whose launches use the ``float64_variant`` of the kernel, so the
    value arrives exactly), float32 otherwise."""
    if like_ptr.dtype.element_ty == tl.float64:
        return tl.full([], value, tl.float64)
    else:
        return tl.full([], value, tl.float32)


@triton.jit
def round_to_bf16(x):
    """fp32 → bf16, round to nearest, ties to even, done on the bits (as c10's BFloat16 does).

    The compiled cast already rounds this way (cvt.rn.bf16.f32), but Triton's interpreter
    truncates; doing it explicitly gives identical bits on both, for a few integer ops."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = tl.where(x != x, bits | 0x00400000, rounded)  # NaN stays (quiet) NaN
    return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are zero


@triton.jit
def rounded_as(value, ptr):
    """``value`` rounded to the storage dtype of ``ptr`` (to nearest even)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return round_to_bf16(value)
    else:
        return value.to(ptr.dtype.element_ty)


@triton.jit
def store_as(ptr, value, mask):
    """Round ``value`` to the storage dtype of ``ptr`` (to nearest even) and store it."""
    tl.store(ptr, rounded_as(value, ptr), mask=mask)


@triton.jit
def stochastic_round_bf16(x, seed, offsets):
    """Round fp32 ``x`` to bf16 stochastically: up with probability equal to the discarded
    fraction, so ``E[round(x)] = x``. Adding a uniform 16-bit integer to the low half of the fp32
    bit pattern and truncating does exactly that (inf stays inf, NaN stays NaN)."""
    noise = tl.randint(seed, offsets.to(tl.int32)) & 0xFFFF
    bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are zero


# ---------------------------------------------------------------- optimizer-step helpers ----


@triton.jit
def lerp(start, end, weight):
    """torch.lerp: ``start + w (end - start)`` for |w| < 0.5, else ``end - (end - start)(1 - w)``
    (``weight`` a scalar, so the branch is uniform)."""
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def scalar(value, value_ptr, ON_DEVICE: tl.constexpr, like_ptr):
    """A hyperparameter passed either by value or, for capturable steps, as a pointer to a device
    scalar (read on the device: no host synchronisation, safe in CUDA graphs); in the compute
    dtype of the tensors at ``like_ptr``."""
    if ON_DEVICE:
        return hyper(tl.load(value_ptr), like_ptr)
    else:
        return hyper(value, like_ptr)


@triton.jit
def launch_epoch(epoch_ptr, COUNT_EPOCH: tl.constexpr):
    """The stochastic-rounding epoch this launch reads (``COUNT_EPOCH``: an optimizer's launch
    count on the device, see ``_step_kernel``; else 0)."""
    if COUNT_EPOCH:
        return tl.load(epoch_ptr)
    else:
        return 0


@triton.jit
def rounding_seed(seed, t, step, epoch):
    """Stochastic rounding's seed for tensor ``t`` this step: the caller's ``seed`` mixed with the
    tensor's index, its ``step`` and the launch ``epoch``, so the noise is fresh per tensor and step."""
    return seed + t * 7919 + (step.to(tl.int32) + epoch) * 104729


@triton.jit
def step_is_skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """AMP: ``found_inf != 0`` means this step's gradients overflowed; the whole step is skipped."""
    if HAS_FOUND_INF:
        return tl.load(found_inf_ptr).to(tl.float32) != 0.0
    else:
        return False


@triton.jit
def load_grad(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """g in the compute dtype, unscaled by AMP's ``grad_scale`` when given, negated for ``maximize``."""
    g = load_compute(grad_ptr + offsets, mask)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(g.dtype)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def add_weight_decay(g, w, weight_decay):
    """``g + λ w`` (L2 weight decay), and exactly ``g`` when λ = 0: torch skips the term then, so
    an infinite weight must not turn the gradient into ``0 · inf = NaN``."""
    return tl.where(weight_decay != 0.0, g + weight_decay * w, g)


@triton.jit
def load_unless_new(ptr, offsets, mask, in_use):
    """A state's block in the compute dtype, or zeros when the state is new (``in_use`` false, a
    per-tensor scalar): the lanes of a new state read nothing, and the mask stays uniform over a
    full block, so the 16-byte loads stay (a branch around two copies of the update made ptxas
    spill the bf16 master-weight SGD step)."""
    if mask is None:
        read = tl.where(in_use, tl.full(offsets.shape, 1, tl.int1), tl.full(offsets.shape, 0, tl.int1))
    else:
        read = tl.where(in_use, mask, tl.full(offsets.shape, 0, tl.int1))
    return widened(tl.load(ptr + offsets, mask=read, other=0.0))


@triton.jit
def load_param(param_ptr, master_ptr, offsets, mask, HAS_MASTER: tl.constexpr):
    """The weight in the compute dtype: the fp32 master copy when there is one, else the parameter.

    The master copy follows edits of the parameter made since the last step (``p.data.clamp_()``,
    ``model.load_state_dict``, EMA weights copied in): an element whose parameter is no longer the
    master's rounding (as ``store_param`` wrote it) starts again from the parameter's value; the
    others keep their fp32 digits. This reads the low-precision parameter (2 bytes an element)."""
    if HAS_MASTER:
        master = tl.load(master_ptr + offsets, mask=mask)
        param = tl.load(param_ptr + offsets, mask=mask)
        return tl.where(param == rounded_as(master, param_ptr), master, param.to(tl.float32))
    else:
        return load_compute(param_ptr + offsets, mask)


@triton.jit
def store_param(param_ptr, master_ptr, offsets, mask, w, seed,
                HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr):
    """Write the new weight: the master copy in fp32, and the parameter rounded to its dtype in
    the same pass (to nearest even, or stochastically for bf16 parameters)."""
    if HAS_MASTER:
        tl.store(master_ptr + offsets, w, mask=mask)
    if STOCHASTIC_ROUNDING:
        tl.store(param_ptr + offsets, stochastic_round_bf16(w, seed, offsets), mask=mask)
    else:
        store_as(param_ptr + offsets, w, mask)


@triton.jit
def one_minus_pow(log_base, t):
    """``1 - base^t`` from ``log(base)`` without cancellation (``1 - 0.999^1`` in fp32 would keep
    only ~4 significant digits): ``-expm1(t log base)`` by Kahan's expm1 (u = e^x, then
    (u - 1) x / log u), accurate to a few ulps; base = 0 (log = -inf) gives 1."""
    x = t * log_base
    u = tl.exp(x)
    expm1 = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(u))
    return -tl.where(u == 0.0, -1.0, expm1)


@triton.jit
def finish_launch(counter_ptr, step_base_ptr, offsets_ptr, STEP_ROLE: tl.constexpr, n_tensors, skipped,
                  epoch_ptr, HAS_STEP: tl.constexpr, COUNT_EPOCH: tl.constexpr, BLOCK: tl.constexpr):
    """Once all programs have read them: add 1 to every tensor's ``step`` (0 when the step was
    skipped) and to the stochastic-rounding epoch.

    Every program reads its tensors' step and the epoch before arriving here; the program that
    arrives last (an acq_rel atomic counts arrivals) does the increments and resets the counter
    for the next launch. So both live on the device, the launch is the whole optimizer step (a
    CUDA-graph replay advances them too), and nothing synchronises with the host."""
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:
        if HAS_STEP:
            increment = tl.where(skipped, 0.0, 1.0)
            for first in range(0, n_tensors, BLOCK):
                t = first + tl.arange(0, BLOCK)
                in_range = t < n_tensors
                step_ptrs = step_base_ptr + tl.load(offsets_ptr + STEP_ROLE * n_tensors + t, mask=in_range, other=0)
                tl.store(step_ptrs, tl.load(step_ptrs, mask=in_range) + increment, mask=in_range)
        if COUNT_EPOCH:
            tl.store(epoch_ptr, tl.load(epoch_ptr) + 1)
        tl.store(counter_ptr, 0)


@triton.jit
def masked_sum_of_squares(x, mask):
    """Σ x² over a block's elements (``mask``: the tail's; masked lanes hold undefined values)."""
    if mask is None:
        return tl.sum(x * x, axis=0)
    else:
        return tl.sum(tl.where(mask, x * x, 0.0), axis=0)


@triton.jit
def fold_sums(block_sums, i, t, first, count, counter_ptr, partials_ptr, sums_ptr,
              N_SUMS: tl.constexpr, BLOCK: tl.constexpr):
    """Per-tensor sums of a launch, without float atomics (the same bits whichever program folds):
    schedule entry ``i`` (a block of tensor ``t``, whose ``count`` blocks are the consecutive
    entries from ``first``) writes its ``N_SUMS`` block sums to ``partials[i]`` and counts itself
    in tensor ``t``'s arrival counter (``counter_ptr[1 + t]``); the block that arrives last for its
    tensor adds the tensor's partials in schedule order and writes ``sums[t]``, then resets the
    counter for the next launch.

    Ordering: the barrier makes every thread's partial stores
    happen before the one thread's acq_rel atomic (release), whose result, broadcast to the
    program, orders the last arriver's loads after every other block's stores (acquire); the
    loads go to L2 (``.cg``), past a stale L1."""
    for k in tl.static_range(N_SUMS):
        tl.store(partials_ptr + i * N_SUMS + k, block_sums[k])
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + 1 + t, 1, sem="acq_rel")
    if arrived == count - 1:
        for k in tl.static_range(N_SUMS):
            total = tl.zeros([], partials_ptr.dtype.element_ty)
            for chunk in range(0, count, BLOCK):
                index = chunk + tl.arange(0, BLOCK)
                partial = tl.load(partials_ptr + (first + index) * N_SUMS + k, mask=index < count, other=0.0,
                                  cache_modifier=".cg")
                total += tl.sum(partial, axis=0)
            tl.store(sums_ptr + t * N_SUMS + k, total)
        tl.store(counter_ptr + 1 + t, 0)


# ---------------------------------------------------------------------- the shared walk -----

# Role bases and hyperparameters are fixed numbers of named arguments rather than tuples: a
# tuple argument cannot be declared tl.float64 (float64 launches need exact hyperparameters,
# ``float64_variant``), and the cached launchers (``gpuopt._launch``) take flat argument lists.
# Unused bases repeat role 0's pointer, unused hyperparameters are 0.0; the compiler drops both.
MAX_ROLES, MAX_HYPER = 7, 9
STEP_ROLE = tl.constexpr(2)  # every optimizer's ROLES begin ("param", "grad", "step", ...)
COMMON_FLAGS = ("maximize", "has_grad_scale", "has_master", "stochastic_rounding")


def step_flags(name: str, fields: str = "", module: str = __name__):
    """The namedtuple type of an algorithm's constexpr ``FLAGS``: its own ``fields`` and the
    ones every optimizer update reads (``COMMON_FLAGS``). ``module``: the caller's
    ``__name__``, which the type belongs to as a namedtuple made there would (pickling, the
    compile report's records find it by module and name)."""
    return collections.namedtuple(name, fields.split() + list(COMMON_FLAGS), module=module)


def _no_states(options) -> tuple:
    return ()


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One multi-tensor algorithm, all that gpuopt needs to run it: the kernel's part (``update``,
    ``per_tensor``, ``flags``: see the module docstring) and the host's (its roles, which of them
    its options need, its launch arguments from its options). A new algorithm is an update
    function and one of these (``tests/test_architecture.py`` adds sign-SGD so).

    ``options`` below are the algorithm's keyword arguments as ``gpuopt.functional`` takes them,
    without ``lr`` (read at every launch) and the precision options (master weights, stochastic
    rounding), which every optimizer shares.

    Attributes:
        roles: the kernel's roles, in the order ``update`` unpacks ``ptrs`` (``<role>_ptr``, or
            ``_`` for one it does not read). An optimizer's begin ``("param", "grad", "step")``
            (the walk reads ``step`` at index 2) and end with ``"master"`` if it supports fp32
            master weights. The names are the optimizer's state keys and the roles' argument
            names in the ``torch.compile`` operator (``gpuopt._traced``).
        hyper: the names of the runtime floats ``update`` and ``per_tensor`` read, in the order
            they unpack ``hyper`` (at most ``MAX_HYPER``); ``tests/test_architecture.py``
            checks every unpacking of ``ptrs`` and ``hyper`` against ``roles`` and ``hyper``.
        update: the ``@triton.jit`` update of one block.
        flags: the namedtuple type of its ``FLAGS`` (``step_flags``); ``None`` for none.
        hyperparameters: ``options -> (values, flags)``: the ``hyper`` values by name (the host
            packs them in ``hyper``'s order) and its own flags by name (``maximize`` included;
            the other common flags are the launch's).
        per_tensor: the per-tensor scalars (``None``: ``step_only``).
        states: ``options -> state roles`` that the options need (made by the optimizer classes).
        uses_step: ``options -> bool``: the ``step`` role is read and advanced (``None``:
            always).
        complex_params: complex parameters are updated as pairs of reals (``False``: refused,
            for an update that is not elementwise on the real and imaginary parts, such as a sign).
        sparse_grads: sparse gradients taken densified: ``"always"``, ``"without weight
            decay"``, or ``None`` (refused, as torch refuses them).
        norms: for an update that needs whole-tensor sums (LAMB's and LARS's norms), a
            ``@triton.jit`` function of one block with ``update``'s signature that returns the
            block's sums (a tuple) and may write states. A step is then two launches over the
            same tensors: ``norms`` on every block, the walk folding each tensor's block sums
            (``fold_sums``), then ``update``, whose ``scalars`` end with its tensor's sums. The
            first launch reads ``step``; the second advances it.
        sums: the names of the sums ``norms`` returns, in order (``()`` without ``norms``).
        tiles: for an update that is not elementwise over blocks (Adafactor's row and column
            statistics of each matrix), its own ``@triton.jit`` kernels, launched in order over a
            schedule of row tiles (``gpuopt._adafactor.TilePlan``); ``update`` is then ``None``.
            Each kernel takes the same arguments: the roles' bases as ``<role>_base`` in ``roles``
            order and the hyperparameters by their ``hyper`` names.
        state_shapes: state roles not shaped like their parameter: ``role -> (shape -> the state's
            shape, or None where a parameter of that shape has no such state)``. A parameter
            without the state has a stand-in in that role's list, which the kernels never touch.
    """

    roles: tuple
    hyper: tuple
    update: object
    flags: type | None
    hyperparameters: Callable
    per_tensor: object = None
    states: Callable = _no_states
    uses_step: Callable | None = None
    complex_params: bool = True
    sparse_grads: str | None = None
    norms: object = None
    sums: tuple = ()
    tiles: tuple = ()
    state_shapes: dict = dataclasses.field(default_factory=dict, hash=False)


@triton.jit
def step_only(step, lr, hyper, FLAGS: tl.constexpr):
    """The default per-tensor scalars: the step number alone."""
    return (step,)


@triton.jit
def _role_pointers(bases, offsets_ptr, t, n_tensors, N_ROLES: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s pointer in each of the first ``N_ROLES`` roles."""
    ptrs = ()
    for role in tl.static_range(N_ROLES):
        ptrs = ptrs + (tensor_ptr(bases[role], offsets_ptr, role, t, n_tensors, ALIGNED),)
    return ptrs


@triton.jit
def _step_kernel(block_tensor_ptr, block_start_ptr, numel_ptr, offsets_ptr, n_blocks, n_tensors,
                 base_0, base_1, base_2, base_3, base_4, base_5, base_6, counter_ptr, lr, lr_ptr,
                 hyper_0, hyper_1, hyper_2, hyper_3, hyper_4, hyper_5, hyper_6, hyper_7, hyper_8,
                 grad_scale_ptr, found_inf_ptr, seed, epoch_ptr, sums_ptr, partials_ptr,
                 UPDATE: tl.constexpr, PER_TENSOR: tl.constexpr, FLAGS: tl.constexpr, N_ROLES: tl.constexpr,
                 N_HYPER: tl.constexpr, HAS_STEP: tl.constexpr, COUNT_EPOCH: tl.constexpr,
                 MAKE_SUMS: tl.constexpr, TAKE_SUMS: tl.constexpr,
                 LR_ON_DEVICE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 RUN: tl.constexpr):
    """One update of every tensor of a bucket (one launch): ``UPDATE`` on each block of the schedule (a
    full block unmasked, a tensor's last block masked), each tensor's ``step`` and the rounding
    epoch advanced once all programs have read them (``finish_launch``), nothing written when
    AMP's ``found_inf`` is set.

    Stochastic rounding's noise is ``tl.randint`` of the caller's ``seed`` mixed with the tensor's
    index, its ``step`` (0 without one) and the epoch at ``epoch_ptr`` (``COUNT_EPOCH``: a launch
    count the optimizer keeps per device; 0 without one, for the functional API, whose caller
    varies ``seed``): fresh on every step, for every algorithm.

    Whole-tensor sums (``Algorithm.norms``): with ``MAKE_SUMS`` (their number) ``UPDATE`` returns
    a block's sums, folded per tensor into ``sums_ptr`` (``fold_sums``), and ``step`` is read but
    not advanced; with ``TAKE_SUMS`` each tensor's sums are appended to its ``scalars``."""
    bases = (base_0, base_1, base_2, base_3, base_4, base_5, base_6)
    slots = (hyper_0, hyper_1, hyper_2, hyper_3, hyper_4, hyper_5, hyper_6, hyper_7, hyper_8)
    lr = scalar(lr, lr_ptr, LR_ON_DEVICE, base_0)
    hyper_values = ()
    for k in tl.static_range(N_HYPER):
        hyper_values = hyper_values + (hyper(slots[k], base_0),)
    skipped = step_is_skipped(found_inf_ptr, HAS_FOUND_INF)
    epoch = launch_epoch(epoch_ptr, COUNT_EPOCH)
    if not skipped:
        for i in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            t, offsets, full, numel = schedule_entry(i, block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
            if RUN:  # elements a thread accesses contiguously (see launch_update)
                offsets = tl.max_contiguous(offsets, RUN)
            if HAS_STEP:
                step_ptr = tensor_ptr(base_2, offsets_ptr, STEP_ROLE, t, n_tensors, ALIGNED)
                step = tl.load(step_ptr).to(lr.dtype) + 1.0
            else:
                step = tl.zeros([], lr.dtype)
            scalars = PER_TENSOR(step, lr, hyper_values, FLAGS)
            for k in tl.static_range(TAKE_SUMS):
                scalars = scalars + (tl.load(sums_ptr + t * TAKE_SUMS + k).to(lr.dtype),)
            ptrs = _role_pointers(bases, offsets_ptr, t, n_tensors, N_ROLES, ALIGNED)
            tensor_seed = rounding_seed(seed, t, step, epoch)
            if MAKE_SUMS:
                if full:
                    block_sums = UPDATE(ptrs, offsets, None, scalars, lr, hyper_values, grad_scale_ptr, tensor_seed,
                                        FLAGS)
                else:
                    block_sums = UPDATE(ptrs, offsets, offsets < numel, scalars, lr, hyper_values, grad_scale_ptr,
                                        tensor_seed, FLAGS)
                # (a tensor's blocks are consecutive in the schedule, LaunchPlan: its first is i - start / BLOCK)
                first = i - tl.load(block_start_ptr + i) // BLOCK
                fold_sums(block_sums, i, t, first, tl.maximum((numel + BLOCK - 1) // BLOCK, 1), counter_ptr,
                          partials_ptr, sums_ptr, MAKE_SUMS, BLOCK)
            elif full:
                UPDATE(ptrs, offsets, None, scalars, lr, hyper_values, grad_scale_ptr, tensor_seed, FLAGS)
            else:
                UPDATE(ptrs, offsets, offsets < numel, scalars, lr, hyper_values, grad_scale_ptr, tensor_seed,
                       FLAGS)
    if not MAKE_SUMS and (HAS_STEP or COUNT_EPOCH):  # (the sums' launch leaves them to the update's)
        finish_launch(counter_ptr, base_2, offsets_ptr, STEP_ROLE, n_tensors, skipped, epoch_ptr, HAS_STEP,
                      COUNT_EPOCH, BLOCK)


_step_f64_kernel = float64_variant(_step_kernel, ("lr",) + tuple(f"hyper_{k}" for k in range(MAX_HYPER)))
