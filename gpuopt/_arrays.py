"""Arrays that are not torch tensors — CuPy on the GPU, NumPy on the CPU, anything that speaks
DLPack — in gpuopt's functional API and ``gpuopt.EMA``.

Each array is seen through a torch tensor sharing its memory (``torch.from_dlpack``: no copy), so
the kernels update the caller's arrays in place; results the API returns (batch norm's output)
come back as arrays of the caller's kind (``numpy.from_dlpack`` / ``cupy.from_dlpack``). CuPy work
runs on the caller's current CuPy stream: the launches are made on it (a torch ``ExternalStream``
of it), so they are ordered after the CuPy work that made the inputs and before whatever the
caller queues next, with no synchronisation. An array gpuopt would write that its owner marked
read-only (NumPy's ``flags.writeable``) is refused: DLPack would hand torch a writable view of it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools

import numpy
import torch


def is_array(x) -> bool:
    """Not a torch tensor, but an array torch can view (``__dlpack__``)."""
    return not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def kind_of(x) -> str:
    """The array's library: ``"numpy"``, ``"cupy"``, ... (its module's top-level name)."""
    return type(x).__module__.split(".")[0]


def as_tensor(x, what: str, written: bool) -> torch.Tensor:
    """``x`` (an array) as a torch tensor on the same memory."""
    flags = getattr(x, "flags", None)
    if written and flags is not None and getattr(flags, "writeable", True) is False:
        raise ValueError(f"{what} is a read-only array (flags.writeable is False); gpuopt updates it in place: "
                         "pass a writable array (e.g. a copy)")
    strides = getattr(x, "strides", None) or ()
    if any(stride < 0 for stride in strides):  # torch.from_dlpack aborts the process on these
        raise ValueError(f"{what} has negative strides {tuple(strides)} (a reversed view such as a[::-1]); "
                         "gpuopt views arrays in place and cannot take one: pass a copy (numpy.ascontiguousarray)")
    try:
        return torch.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError) as error:
        raise TypeError(f"{what}: torch cannot view this {kind_of(x)} array through DLPack ({error}); gpuopt "
                        "takes torch tensors, or arrays torch.from_dlpack accepts (NumPy, CuPy, ...)") from error


def as_array(t: torch.Tensor, kind: str):
    """``t`` as an array of library ``kind`` on the same memory."""
    if kind == "numpy":
        return numpy.from_dlpack(t.detach())
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(t.detach())
    raise TypeError(f"gpuopt returns arrays as NumPy or CuPy arrays, not {kind}")


@contextlib.contextmanager
def caller_stream(kind: str):
    """Launch on the caller's current CuPy stream (CuPy arrays); nothing to do for NumPy."""
    if kind != "cupy":
        yield
        return
    import cupy

    with torch.cuda.stream(torch.cuda.ExternalStream(cupy.cuda.get_current_stream().ptr)):
        yield


def _convert(value, name: str, written: bool, kinds: set):
    if is_array(value):
        kinds.add(kind_of(value))
        return as_tensor(value, name, written)
    if isinstance(value, (list, tuple)) and any(map(is_array, value)):
        converted = []
        for i, item in enumerate(value):
            converted.append(_convert(item, f"{name}[{i}]", written, kinds))
        return converted
    return value


_PLAIN = (torch.Tensor, type(None), bool, int, float, str, torch.dtype)


def _no_array(value) -> bool:
    """Nothing to convert: a tensor, a number, None..., or a list of those."""
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, (list, tuple)) and all(map(isinstance, value, itertools.repeat(_PLAIN)))


def accepts_arrays(read=("grads",)):
    """Decorate a functional-API function so that its array arguments (lists of arrays, or
    arrays) reach it as torch tensors on the same memory, it runs on the caller's CuPy stream,
    and the tensors it returns (alone or in a tuple) go back as arrays of the caller's kind. ``read``: the arguments
    it only reads (the others must be writable arrays)."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if all(map(_no_array, args)) and all(map(_no_array, kwargs.values())):
                return fn(*args, **kwargs)  # torch tensors (the common case: C-level checks only)
            bound = signature.bind(*args, **kwargs)
            kinds: set = set()
            for name, value in bound.arguments.items():
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:  # **kwargs passed on
                    bound.arguments[name] = {key: _convert(item, key, key not in read, kinds)
                                             for key, item in value.items()}
                else:
                    bound.arguments[name] = _convert(value, name, name not in read, kinds)
            if not kinds:  # no array after all (a NumPy scalar hyperparameter): as given
                return fn(*bound.args, **bound.kwargs)
            if len(kinds) > 1:
                raise TypeError(f"{fn.__name__}: arrays of several libraries ({', '.join(sorted(kinds))}); pass one "
                                "kind (NumPy arrays on the CPU, or CuPy arrays on a GPU)")
            kind = kinds.pop()
            with caller_stream(kind):
                result = fn(*bound.args, **bound.kwargs)
            if isinstance(result, tuple):
                return tuple(as_array(r, kind) if isinstance(r, torch.Tensor) else r for r in result)
            return as_array(result, kind) if isinstance(result, torch.Tensor) else result

        return wrapper

    return decorate
