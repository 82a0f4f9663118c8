"""gpuopt's compiled host helpers: ``_host_check.cpp``, built once per torch and Python version,
in the background, and loaded when ready. Everything here has a Python form that runs until then
and wherever the module cannot be built.

* ``check``: an optimizer step's fast-path check (``_fused._PreparedGroup``). A reused step must
  check every tensor the kernel touches: in Python ~7 C-level passes over the group at ~0.1 µs
  per tensor each (~120 µs for SGD on ResNet-50's 161 parameters); in C++ one loop, a few ns per
  tensor.
* ``argument_key``: what Triton specialises a launch's arguments on (``_launch``), ~0.8 µs
  against ~2 µs.
* ``tensor_record`` / ``tensors_match`` (``TensorRecord``): a batch-norm module's check that its
  last call's plan still fits (``_batch_norm.LayerPlan``).

Building takes ~25-45 s (torch's headers), so it is never waited for: the first optimizer step
or batch-norm plan starts the build in a background thread (the compiler runs in its own
process), and later processes load it from the cache (``$GPUOPT_CACHE_DIR``, else
``~/.cache/gpuopt``) at once. ``GPUOPT_HOST_CHECK=0`` turns it off; without a C++ compiler or
Python's headers it is simply absent; ``status()`` says which.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from ._validate import layout_check

_SOURCE = Path(__file__).with_name("_host_check.cpp")
_MODULE_NAME = "_gpuopt_host_check"  # PyInit__gpuopt_host_check in the source
HIT, MOVED, MISS = 0, 1, 2  # check()'s answers: nothing changed, the gradients alone moved, anything else

_module = None  # the loaded module, once ready
_lock = threading.Lock()
_started = False
_builder: threading.Thread | None = None  # the build running or finished and not yet loaded
_status = "not started"


def enabled() -> bool:
    return os.environ.get("GPUOPT_HOST_CHECK", "1").lower() not in ("0", "false", "off", "no")


def module():
    """The compiled module, or None while it is not (yet) there. The hot path's call: one read
    once loaded or given up; otherwise loads a build the background thread has finished."""
    if _builder is None or _builder.is_alive():
        return _module
    return _load_built()


def start() -> None:
    """Load the module from the cache, or start building it in the background (once per process)."""
    global _started, _builder, _status
    if _started:
        return
    with _lock:
        if _started:
            return
        _started = True
        if not enabled():
            _status = "off (GPUOPT_HOST_CHECK=0)"
        elif _target().exists():
            _status = "cached"
            _load()
        else:
            _status = "building"
            _builder = threading.Thread(target=_build, name="gpuopt-host-check-build", daemon=True)
            _builder.start()


def wait(timeout: float | None = None):
    """Start if needed and wait for the build: the module, or None (``status()`` says why)."""
    start()
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    return module()


def status() -> str:
    """What happened: 'loaded', 'building', 'off (...)', 'unavailable: <reason>', 'not started'."""
    return "loaded" if _module is not None else _status


class TensorRecord:
    """The layouts and addresses of some tensors (or Nones), to tell whether later ones match:
    dispatch keys, dtype, device, sizes, strides, and ``address & mask`` (``mask`` per tensor:
    -1 for the exact address, 15 for its 16-byte alignment alone). One C++ call when the compiled
    module was loaded at recording, else the optimizer's layout check (``_validate``) and an
    address compare; a Python record no longer matches once the compiled module is ready (its
    owner records again, in C++)."""

    __slots__ = ("masks", "words", "python")

    def __init__(self, tensors: tuple, masks: tuple):
        start()
        host = module()
        self.masks = masks
        self.words = host.tensor_record(tensors, masks) if host is not None else None
        # The Python form: which are None, the masked addresses, and the optimizer's layout check
        # of the rest (``_validate.layout_check``).
        self.python = None if host is not None else (_addresses(tensors, masks),
                                                     layout_check([t for t in tensors if t is not None]))

    def matches(self, tensors: tuple) -> bool:
        if self.words is not None:
            return _module.tensors_match(tensors, self.words)
        if module() is not None:
            return False
        addresses, layout = self.python
        try:
            return _addresses(tensors, self.masks) == addresses and layout.check(*[t for t in tensors if t is not None])
        except (AttributeError, RuntimeError, TypeError):  # not a tensor, or a tensor without storage
            return False


def _addresses(tensors: tuple, masks: tuple) -> tuple:
    return tuple(None if t is None else t.data_ptr() & mask for t, mask in zip(tensors, masks, strict=True))


def _cache_dir() -> Path:
    root = os.environ.get("GPUOPT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpuopt"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _command(output: Path) -> list[str] | None:
    """The compiler's command line, as torch's own extensions build (its headers, ABI flag and
    libraries), or None when there is no compiler or no Python headers."""
    from torch.utils import cpp_extension

    compiler, python_include = _compiler(), sysconfig.get_paths()["include"]
    if compiler is None or not Path(python_include, "Python.h").exists():
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [compiler, "-O2", "-std=c++20", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-isystem{path}" for path in [*cpp_extension.include_paths(), python_include]),
            str(_SOURCE), "-o", str(output), f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            f"-Wl,-rpath,{torch_lib}"]


@functools.lru_cache(maxsize=None)
def _target() -> Path:
    """The built module's path: one per source, torch build and Python version."""
    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update(f"{torch.__version__} {torch.__file__} {sys.version} {sys.platform}".encode())
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return _cache_dir() / f"host_check-{key.hexdigest()[:16]}{suffix}"


def _build() -> None:
    """Compile the module into the cache. One process builds at a time (a lock file: the ranks
    of a job started together wait for the first one's build and then find it), and the file
    appears whole (built aside, then renamed)."""
    global _status
    target = _target()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.with_suffix(".lock"), "w") as lock:
            _lock_file(lock)
            if target.exists():  # another process built it while this one waited
                return
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                output = Path(scratch, target.name)
                command = _command(output)
                if command is None:
                    _status = "unavailable: no C++ compiler or no Python headers"
                    return
                done = subprocess.run(command, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    _status = f"unavailable: the compiler failed: {done.stderr.strip()[-2000:]}"
                    return
                os.replace(output, target)
    except (OSError, subprocess.SubprocessError) as error:
        _status = f"unavailable: {error}"


def _lock_file(file) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: builds may overlap, each still renames a whole file
        return
    fcntl.flock(file, fcntl.LOCK_EX)  # released when the file closes


def _load_built():
    """The build thread has finished: load what it made (once; a failure is not retried)."""
    global _builder
    with _lock:
        if _builder is not None:
            _builder = None
            if _target().exists():
                _load()
    return _module


def _load() -> None:
    global _module, _status
    target = _target()
    try:
        loader = importlib.machinery.ExtensionFileLoader(_MODULE_NAME, str(target))
        loaded = importlib.util.module_from_spec(importlib.util.spec_from_file_location(_MODULE_NAME, target,
                                                                                          loader=loader))
        loader.exec_module(loaded)
    except ImportError as error:
        _status = f"unavailable: {error}"
        return
    _module = loaded
