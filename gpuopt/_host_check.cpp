// The optimizer step's fast-path check in one C++ pass (see gpuopt/_host_check.py, which builds
// and loads this file, and _fused._PreparedGroup, which uses it).
//
// A validated param group is reused by the next step when nothing the kernel touches changed:
// the same parameter objects, every parameter and state at its validated address, and every
// gradient where it was (or, all of them, moved elsewhere) with its validated layout. From
// Python that is ~7 passes over the group at ~0.1 µs per tensor each (attribute reads and
// method calls); here it is one loop of a few ns per tensor, reading what torch's own Python
// getters read (`p.grad`, `t.data_ptr()`, sizes, strides, dtype, device, dispatch keys).
//
// Nothing here raises into Python on a mismatch or on any unexpected object: the answer is then
// MISS, and the caller validates everything on the slow path, which explains any error.

#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Answer : long { HIT = 0, MOVED = 1, MISS = 2 };
constexpr int64_t kAbsent = -1;  // a parameter without a gradient (its record and its address)

// The words describing a tensor's layout as the kernels read it: dispatch keys (dense or
// sparse, conjugate or negative bits, a Python subclass), dtype, device, rank, sizes, strides.
void append_layout(std::vector<int64_t>& words, const at::Tensor& t) {
  words.push_back(static_cast<int64_t>(t.key_set().raw_repr()));
  words.push_back(static_cast<int64_t>(t.scalar_type()));
  words.push_back(static_cast<int64_t>(t.device().type()) * 65536 + t.device().index());
  words.push_back(t.dim());
  for (int64_t size : t.sizes()) words.push_back(size);
  for (int64_t stride : t.strides()) words.push_back(stride);
}

// Does `t` have the layout recorded at `words[at...]`? Advances `at` past the record either way
// (the record says its own length). Compares the dispatch keys before sizes and strides, which
// only a strided tensor has.
bool same_layout(const int64_t* words, size_t& at, size_t end, const at::Tensor& t) {
  if (at + 4 > end) return false;
  const int64_t dim = words[at + 3];
  const size_t next = at + 4 + 2 * static_cast<size_t>(dim);
  const int64_t* record = words + at;
  at = next;
  if (next > end || record[0] != static_cast<int64_t>(t.key_set().raw_repr()) ||
      record[1] != static_cast<int64_t>(t.scalar_type()) ||
      record[2] != static_cast<int64_t>(t.device().type()) * 65536 + t.device().index() ||
      dim != t.dim() || t.layout() != c10::kStrided) {
    return false;
  }
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  return std::memcmp(record + 4, sizes.data(), dim * sizeof(int64_t)) == 0 &&
         std::memcmp(record + 4 + dim, strides.data(), dim * sizeof(int64_t)) == 0;
}

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

// A read-only or writable view of an int64 buffer (bytes, a NumPy array).
struct Words {
  Py_buffer view{};
  bool ok = false;
  Words(PyObject* object, bool writable) {
    ok = PyObject_GetBuffer(object, &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) == 0;
  }
  ~Words() {
    if (ok) PyBuffer_Release(&view);
  }
  int64_t* data() const { return static_cast<int64_t*>(view.buf); }
  size_t size() const { return static_cast<size_t>(view.len) / sizeof(int64_t); }
};

// layout_record(grads) -> bytes: each gradient's layout words, or kAbsent for None.
PyObject* layout_record(PyObject*, PyObject* grads) {
  PyObject* items = PySequence_Fast(grads, "layout_record: a list of tensors or None");
  if (items == nullptr) return nullptr;
  std::vector<int64_t> words;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
  PyObject** item = PySequence_Fast_ITEMS(items);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (item[i] == Py_None) {
        words.push_back(kAbsent);
      } else if (THPVariable_Check(item[i])) {
        append_layout(words, THPVariable_Unpack(item[i]));
      } else {
        Py_DECREF(items);
        PyErr_SetString(PyExc_TypeError, "layout_record: a list of tensors or None");
        return nullptr;
      }
    }
  } catch (const std::exception& error) {
    Py_DECREF(items);
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_DECREF(items);
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

// check(params, kept, touched, touched_addresses, grad_record, grad_addresses, new_addresses) -> int
//   params             the group's parameter list now
//   kept               the parameters validated (a tuple): compared by identity
//   touched            the parameters, states and master copies the launches write (a tuple)
//   touched_addresses  their validated addresses (int64)
//   grad_record        layout_record of the validated gradients
//   grad_addresses     their validated addresses (int64, kAbsent where none)
//   new_addresses      (int64, writable) the gradients' addresses now, when the answer is MOVED
// HIT: nothing changed. MOVED: every recorded gradient is present with its recorded layout, at
// least one at a new address (all written to new_addresses). MISS: anything else.
PyObject* check(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7 || !PyTuple_CheckExact(args[1]) || !PyTuple_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "check: (list, tuple, tuple, buffer, buffer, buffer, buffer)");
    return nullptr;
  }
  Words touched_addresses(args[3], false), record(args[4], false), grad_addresses(args[5], false),
      new_addresses(args[6], true);
  if (!touched_addresses.ok || !record.ok || !grad_addresses.ok || !new_addresses.ok) return nullptr;
  if (!PyList_CheckExact(args[0]) && !PyTuple_CheckExact(args[0])) return PyLong_FromLong(MISS);

  PyObject** params = PySequence_Fast_ITEMS(args[0]);  // (a list or a tuple: no copy, no reference)
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[0]);
  const Py_ssize_t n_touched = PyTuple_GET_SIZE(args[2]);
  if (n != PyTuple_GET_SIZE(args[1]) || static_cast<size_t>(n) != grad_addresses.size() ||
      static_cast<size_t>(n) != new_addresses.size() ||
      static_cast<size_t>(n_touched) != touched_addresses.size()) {
    return PyLong_FromLong(MISS);
  }
  long answer = HIT;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (params[i] != PyTuple_GET_ITEM(args[1], i)) return PyLong_FromLong(MISS);
    }
    for (Py_ssize_t i = 0; i < n_touched; ++i) {  // (validated tensors, kept by the caller)
      PyObject* tensor = PyTuple_GET_ITEM(args[2], i);
      if (!THPVariable_Check(tensor) || address(THPVariable_Unpack(tensor)) != touched_addresses.data()[i]) {
        return PyLong_FromLong(MISS);
      }
    }
    size_t at = 0;
    const int64_t* words = record.data();
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(params[i])) return PyLong_FromLong(MISS);
      const at::Tensor& grad = THPVariable_Unpack(params[i]).grad();
      const int64_t expected = grad_addresses.data()[i];
      if (!grad.defined()) {
        if (expected != kAbsent || at >= record.size() || words[at] != kAbsent) return PyLong_FromLong(MISS);
        ++at;
        new_addresses.data()[i] = kAbsent;
        continue;
      }
      if (expected == kAbsent || !same_layout(words, at, record.size(), grad)) return PyLong_FromLong(MISS);
      const int64_t now = address(grad);
      new_addresses.data()[i] = now;
      if (now != expected) answer = MOVED;
    }
    if (at != record.size()) return PyLong_FromLong(MISS);
  } catch (...) {  // anything torch refuses (a tensor without storage, ...): the slow path explains it
    return PyLong_FromLong(MISS);
  }
  return PyLong_FromLong(answer);
}

// tensor_record(tensors: tuple, masks: tuple) -> bytes: each tensor's layout words and
// (address & mask, mask), or kAbsent for None. mask -1 records the exact address; 15, the
// address's 16-byte alignment only (an activation that is new every call).
PyObject* tensor_record(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(args[0]) || !PyTuple_CheckExact(args[1]) ||
      PyTuple_GET_SIZE(args[0]) != PyTuple_GET_SIZE(args[1])) {
    PyErr_SetString(PyExc_TypeError, "tensor_record: (tuple of tensors or None, tuple of int masks)");
    return nullptr;
  }
  std::vector<int64_t> words;
  try {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[0]); ++i) {
      PyObject* item = PyTuple_GET_ITEM(args[0], i);
      if (item == Py_None) {
        words.push_back(kAbsent);
        continue;
      }
      const int64_t mask = PyLong_AsLongLong(PyTuple_GET_ITEM(args[1], i));
      if (!THPVariable_Check(item) || PyErr_Occurred()) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "tensor_record: a tensor or None");
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      append_layout(words, t);
      words.push_back(address(t) & mask);
      words.push_back(mask);
    }
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words.data()),
                                   static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

// tensors_match(tensors: tuple, record: bytes) -> bool: the tensors (or Nones) have the
// recorded layouts and addresses (under their masks). False for anything else, never raises.
PyObject* tensors_match(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(args[0])) Py_RETURN_FALSE;
  Words record(args[1], false);
  if (!record.ok) return nullptr;
  const int64_t* words = record.data();
  size_t at = 0;
  try {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[0]); ++i) {
      PyObject* item = PyTuple_GET_ITEM(args[0], i);
      if (at >= record.size()) Py_RETURN_FALSE;
      if (item == Py_None || words[at] == kAbsent) {
        if (item != Py_None || words[at] != kAbsent) Py_RETURN_FALSE;
        ++at;
        continue;
      }
      if (!THPVariable_Check(item)) Py_RETURN_FALSE;
      const at::Tensor& t = THPVariable_Unpack(item);
      if (!same_layout(words, at, record.size(), t) || at + 2 > record.size() ||
          (address(t) & words[at + 1]) != words[at]) {
        Py_RETURN_FALSE;
      }
      at += 2;
    }
  } catch (...) {
    Py_RETURN_FALSE;
  }
  if (at != record.size()) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

// argument_key(args: tuple) -> bytes | None: what Triton may specialise a launch's arguments on
// (gpuopt/_launch.py): each argument's Python type, and a tensor's dtype and 16-byte alignment,
// an int's or bool's value. None when an argument is beyond it (an int wider than 64 bits, a
// tensor without storage): the Python key then decides, or raises as Triton would.
PyObject* argument_key(PyObject*, PyObject* args) {
  if (!PyTuple_CheckExact(args)) {
    PyErr_SetString(PyExc_TypeError, "argument_key: a tuple");
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  constexpr Py_ssize_t kOnStack = 64;  // arguments (the optimizers pass ~30)
  int64_t on_stack[2 * kOnStack];
  std::vector<int64_t> on_heap(n > kOnStack ? 2 * n : 0);
  int64_t* words = n > kOnStack ? on_heap.data() : on_stack;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* arg = PyTuple_GET_ITEM(args, i);
      words[2 * i] = reinterpret_cast<int64_t>(Py_TYPE(arg));
      if (THPVariable_Check(arg)) {
        const at::Tensor& t = THPVariable_Unpack(arg);
        words[2 * i + 1] = static_cast<int64_t>(t.scalar_type()) * 2 + (address(t) % 16 == 0);
      } else if (PyLong_CheckExact(arg) || PyBool_Check(arg)) {
        int overflow = 0;
        words[2 * i + 1] = PyLong_AsLongLongAndOverflow(arg, &overflow);
        if (overflow != 0) Py_RETURN_NONE;
      } else {
        words[2 * i + 1] = 0;
      }
    }
  } catch (...) {
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(words), 2 * n * sizeof(int64_t));
}

PyMethodDef methods[] = {
    {"argument_key", argument_key, METH_O, "argument_key(args) -> bytes | None"},
    {"tensor_record", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(tensor_record)), METH_FASTCALL,
     "tensor_record(tensors, masks) -> bytes"},
    {"tensors_match", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(tensors_match)), METH_FASTCALL,
     "tensors_match(tensors, record) -> bool"},
    {"layout_record", layout_record, METH_O, "layout_record(grads) -> bytes"},
    {"check", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(check)), METH_FASTCALL,
     "check(params, kept, touched, touched_addresses, grad_record, grad_addresses, new_addresses) -> int"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gpuopt_host_check", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__gpuopt_host_check() { return PyModule_Create(&module); }
