"""The one validation layer: every tensor a multi-tensor kernel touches, checked against what the
kernel assumes, before any launch.

A launch pairs element ``k`` of parameter ``i`` with element ``k`` of every other role's tensor
``i`` *by storage position* (``gpuopt/kernels/_multi_tensor.py``). So, for every ``i``:

* the parameter is a dense floating-point tensor (its elements fill ``numel`` consecutive slots in
  some dimension order: contiguous, channels-last, any permutation), on a device Triton runs on,
  and its address is a multiple of its element size (``torch.frombuffer(..., offset=2)`` is not);
* every other role's tensor ``i`` (gradient, states, master copy) has the parameter's shape *and
  strides*, lies on the parameter's device, is floating point and aligned likewise; ``step`` is a
  one-element float32 tensor on that device;
* no two tensors the kernel writes overlap in memory (a parameter listed twice, two views of one
  buffer, a ``step`` shared by two parameters), because all of them are updated concurrently.

Who fixes what before this runs: a gradient in another layout is copied to the parameter's
(``matching_layout``); the optimizers migrate their own states to a parameter whose layout changed
(``like_param``). Whatever is left is an error with a message naming the tensor and the fix.
This runs whenever anything changed (see ``gpuopt._fused``): never on the steady-state fast path.
"""

from __future__ import annotations


import torch

from ._launch import check_kernel_device

try:  # a private torch API: probed below before it is used
    from torch._C._dynamo.guards import TensorGuards
except ImportError:
    TensorGuards = None

FLOAT_DTYPES = frozenset((torch.float32, torch.float16, torch.bfloat16, torch.float64))
COMPLEX_DTYPES = frozenset((torch.complex64, torch.complex128))
PARAM_DTYPES = FLOAT_DTYPES | COMPLEX_DTYPES
READ_ONLY_ROLES = frozenset(("grad", "value", "orthogonalized", "lr_scale"))  # the kernels never write these
PER_TENSOR_ROLES = frozenset(("step", "lr_scale"))  # one float32 number per tensor, not one per element


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements fill ``numel`` consecutive storage slots in some dim order
    (contiguous, channels-last, any permutation): such a tensor can be updated as a flat array."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same storage position for every element (strides of size-1 dims and of
    tensors with at most one element do not matter)."""
    if a.shape != b.shape:
        return False
    if a.numel() <= 1:
        return True
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def matching_layout(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The gradient in the parameter's memory layout (the kernel pairs elements by storage
    position). Autograd nearly always produces this already; otherwise one copy is made."""
    if grad.stride() == param.stride() or same_layout(grad, param):
        return grad
    return torch.empty_like(param, dtype=grad.dtype, memory_format=torch.preserve_format).copy_(grad)


def like_param(value: torch.Tensor, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``value`` (same shape as ``param``) in ``param``'s memory layout, device and
    ``dtype``: how a state follows its parameter into channels-last, or out of a checkpoint."""
    out = torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format)
    return out.copy_(value.detach())


def follow_layout(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A state (or EMA average) whose parameter changed memory layout
    (``model.to(memory_format=torch.channels_last)`` replaces ``p.data``), copied into the new
    layout with its values kept, as torch's elementwise updates would pair them; otherwise
    ``value`` itself. A size mismatch is left for ``check_roles`` to refuse."""
    if value.shape == param.shape and not same_layout(value, param):
        return like_param(value, param, value.dtype)
    return value


def real_views(roles: dict) -> dict:
    """Every complex tensor of a launch as its real view (``torch.view_as_real``: shape
    ``(..., 2)``): gpuopt's optimizers, like torch's, update a complex number as two reals."""
    if not any(map(torch.Tensor.is_complex, roles[next(iter(roles))])):
        return roles
    return {role: None if tensors is None else [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
            for role, tensors in roles.items()}


def check_params_and_grads(name: str, params, grads) -> None:
    """The caller's tensors: floating-point params with a gradient of the same shape on the same
    device, dense params, on a device the kernels run on. One cheap test per pair; the message is
    worked out only when it fails."""
    for p, g in zip(params, grads):
        if (not isinstance(g, torch.Tensor) or g.layout is not torch.strided or p.dtype not in PARAM_DTYPES
                or g.dtype not in PARAM_DTYPES or g.is_complex() != p.is_complex() or g.shape != p.shape
                or g.device != p.device):
            _explain_bad_pair(name, p, g)
    for p in {p.device: p for p in params}.values():  # one parameter per device
        check_kernel_device(p, f"{name}'s parameter")


def _explain_bad_pair(name, p, g):
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name}: gradients must be tensors, got {type(g).__name__}")
    if g.is_sparse or g.layout is not torch.strided:
        raise RuntimeError(f"{name} does not support sparse gradients; use torch.optim.SparseAdam "
                           "or densify the gradient (grad.to_dense())")
    if p.is_complex() != g.is_complex():
        raise RuntimeError(f"{name}: a {p.dtype} parameter has a {g.dtype} gradient; a complex parameter "
                           "needs a complex gradient and a real one a real gradient")
    if not p.is_floating_point():
        raise RuntimeError(f"{name} updates floating-point parameters; got a {p.dtype} parameter")
    if not g.is_floating_point():
        raise RuntimeError(f"{name}: gradient has dtype {g.dtype}, expected a floating-point gradient")
    if g.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(g.shape)} does not match parameter "
                           f"shape {tuple(p.shape)}")
    raise RuntimeError(f"{name}: gradient on {g.device} but parameter on {p.device}; "
                       "parameters, gradients and states must share a device")


def check_roles(name: str, roles: dict, role_names, state_shapes=None) -> None:
    """Everything the kernel assumes about one launch's tensors (module docstring). ``roles`` maps
    a role name to a list aligned with the first role's (the reference: ``param``, or EMA's
    ``average``), or to ``None`` (absent: the kernel's flags keep it from being touched).
    ``state_shapes`` (``Algorithm.state_shapes``): states with a shape of their own (Adafactor's
    row and column factors), contiguous, or absent for a parameter (its entry a stand-in, not
    checked). Raises before anything is modified."""
    reference = role_names[0]
    params = roles[reference]
    what = "parameter" if reference == "param" else reference
    for role in role_names:
        tensors = roles.get(role)
        if tensors is not None and len(tensors) != len(params):
            raise ValueError(f"{name}: got {len(tensors)} {role} tensors for {len(params)} {what}s")
    for p in {p.device: p for p in params}.values():  # one per device
        check_kernel_device(p, f"{name}'s {what}")
    written = []
    for i, p in enumerate(params):
        _check_storage(name, what, i, p)
        if p.numel():
            written.append((p.data_ptr(), p.numel() * p.element_size(), f"{what} {i}"))
        for role in role_names[1:]:
            tensors = roles.get(role)
            if tensors is None or tensors[i] is p:  # absent, or the param as a stand-in
                continue
            own_shape = state_shapes[role](p.shape) if state_shapes and role in state_shapes else ()
            if own_shape is None:  # a stand-in: this parameter has no such state
                continue
            t = tensors[i]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {role} {i} must be a tensor, got {type(t).__name__}")
            if own_shape != ():
                _check_own_shape(name, role, i, t, p, own_shape)
            elif role in PER_TENSOR_ROLES:
                if t.dtype != torch.float32 or t.numel() != 1 or t.device != p.device:
                    raise RuntimeError(
                        f"{name}: state {role} {i} must be a one-element float32 tensor on the parameter's device "
                        f"({p.device}), as torch's fused/capturable optimizers keep it; got {t.dtype} "
                        f"{tuple(t.shape)} on {t.device}")
            else:
                _check_against(name, role, i, t, p, what)
            _check_storage(name, role, i, t)
            if role not in READ_ONLY_ROLES and t.numel():
                written.append((t.data_ptr(), t.numel() * t.element_size(), f"{role} {i}"))
    _check_no_overlap(name, written)


def _check_own_shape(name, role, i, t, p, shape):
    """A state with a shape of its own (``state_shapes``): that shape, contiguous (the kernels
    index it so), floating point, on the parameter's device. Empty along a dim of size 1 is a
    shard holding none of it (FSDP2's col_var on all ranks but the first: torch.chunk of one
    row); the kernels leave such a state alone."""
    if len(t.shape) != len(shape) or any(a != e and not (a == 0 and e == 1) for a, e in zip(t.shape, shape)):
        raise RuntimeError(f"{name}: {role} {i} has shape {tuple(t.shape)} but a parameter of shape {tuple(p.shape)} "
                           f"keeps a {role} of shape {tuple(shape)}")
    _check_device_and_dtype(name, role, i, t, p, "parameter")
    if not t.is_contiguous():
        raise RuntimeError(f"{name}: {role} {i} has strides {t.stride()}; it must be contiguous (.contiguous())")


def _check_against(name, role, i, t, p, what):
    if t.shape != p.shape:
        raise RuntimeError(f"{name}: {role} {i} has shape {tuple(t.shape)} but its {what} has shape "
                           f"{tuple(p.shape)} (states must match their parameter's size, as in torch.optim)")
    _check_device_and_dtype(name, role, i, t, p, what)
    if not same_layout(t, p):
        raise RuntimeError(
            f"{name}: {role} {i} has strides {t.stride()} but its {what} has strides {p.stride()}: the "
            "kernel pairs elements by memory position, so every state must share its parameter's memory "
            "layout (make it with torch.zeros_like(param), or copy it into one)")


def _check_device_and_dtype(name, role, i, t, p, what):
    if t.device != p.device:
        raise RuntimeError(f"{name}: {role} {i} is on {t.device} but its {what} on {p.device}; "
                           "parameters, gradients and states must share a device")
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{name}: {role} {i} has dtype {t.dtype}; it must be floating point")


def _check_storage(name, role, i, t):
    """Dense, and aligned to the element size (the kernel addresses it in whole elements)."""
    if t.numel() > 1 and not is_dense(t):
        raise ValueError(f"{name}: {role} {i} is not dense (shape {tuple(t.shape)}, strides {t.stride()}); "
                         "gpuopt updates tensors whose elements fill their storage span (call .contiguous() "
                         "on it first)")
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{name}: {role} {i} starts at address {t.data_ptr():#x}, not a multiple of its "
                         f"element size ({t.element_size()} bytes), e.g. torch.frombuffer with an odd offset; "
                         "gpuopt refuses misaligned storage (copy it into a fresh tensor)")


def _check_no_overlap(name, written):
    """No two written tensors share a byte: they are all updated at once."""
    written.sort()
    for (start, size, what), (next_start, _, next_what) in zip(written, written[1:]):
        if next_start < start + size:
            raise RuntimeError(f"{name}: {what} and {next_what} overlap in memory; every tensor the step "
                               "writes must be distinct (is a parameter listed twice, or a step or state "
                               "shared between parameters?)")


def _torch_tensor_guards():
    """torch's C++ tensor check (``torch._C._dynamo.guards.TensorGuards``, what Dynamo's guards
    were built on), if this torch has it and it behaves as relied on: a static check of each
    tensor's Python type, dtype, device, sizes, strides and dispatch keys in one C call, holding
    no reference to the tensors. Probed once, at import; checked on torch 2.13 (CI). Else None:
    no layout check, so nothing validated is reused (every step takes the plain path)."""
    if TensorGuards is None:
        return None
    try:
        t = torch.zeros(2, 3)
        guard = TensorGuards(t, dynamic_dims_sizes=[[2, 3]], dynamic_dims_strides=[[3, 1]])
        same = guard.check(torch.ones(2, 3))
        others = (torch.zeros(3, 2).t(), torch.zeros(2, 4)[:, :3], torch.zeros(2, 2),
                  torch.zeros(2, 3, dtype=torch.float64), torch.nn.Parameter(torch.zeros(2, 3)))
        if same and not any(guard.check(o) for o in others):
            return TensorGuards
    except Exception:  # noqa: BLE001 - an internal API: anything unexpected means "not usable"
        pass
    return None


_TENSOR_GUARDS = _torch_tensor_guards()


def layout_check(tensors):
    """A check that a later list of tensors has the sizes, strides, dtypes, devices and types of
    ``tensors`` now: ``layout_check(ts).check(*later) -> bool``, holding no reference to the
    tensors; None where this torch has no usable check (then the caller reuses nothing).
    The one layout check of gpuopt's reuse of validated work (the optimizers' prepared groups,
    a batch-norm module's last call)."""
    if _TENSOR_GUARDS is None:
        return None
    tensors = list(tensors)
    return _TENSOR_GUARDS(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                          dynamic_dims_strides=[list(t.stride()) for t in tensors])
