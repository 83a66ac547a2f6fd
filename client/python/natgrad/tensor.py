"""natgrad.v1.Tensor <-> numpy (docs/architecture.md): dtype + row-major shape +
little-endian bytes."""
import numpy as np

from natgrad._pb import tensor_pb2

FLOAT32 = tensor_pb2.FLOAT32
FLOAT64 = tensor_pb2.FLOAT64

_NP = {tensor_pb2.FLOAT32: np.dtype("<f4"), tensor_pb2.FLOAT64: np.dtype("<f8")}


def _wire_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, int) and dtype in _NP:
        return dtype
    d = np.dtype(dtype)
    if d == np.float32:
        return tensor_pb2.FLOAT32
    if d == np.float64:
        return tensor_pb2.FLOAT64
    raise TypeError(f"unsupported dtype {d} (natgrad sends float32 or float64)")


def as_array(x):
    """Anything array-like (numpy, torch tensor on any device, jax array) -> numpy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_tensor(x, dtype=None, out=None, shm=None):
    """numpy-like -> natgrad.v1.Tensor. Float arrays keep their precision
    (float16/bfloat16/ints become float32) unless ``dtype`` is given.

    shm: a writer with ``write(array, np_dtype, span)`` (a Session's shared
    memory, natgrad.shared_memory): the values are copied into shared memory
    in one pass, converting the dtype on the way, and the tensor carries the
    span instead of ``data``. Empty tensors stay inline (no bytes to move)."""
    a = as_array(x)
    wd = _wire_dtype(dtype)
    if wd is None:
        wd = (tensor_pb2.FLOAT64 if a.dtype.kind == "f" and a.dtype.itemsize == 8
              else tensor_pb2.FLOAT32)
    t = out if out is not None else tensor_pb2.Tensor()
    t.dtype = wd
    del t.shape[:]
    t.shape.extend(int(s) for s in a.shape)
    if shm is not None and a.size > 0:
        t.data = b""
        shm.write(a, _NP[wd], t.shared_memory)
        return t
    a = np.asarray(a, dtype=_NP[wd], order="C")  # (ascontiguousarray would make 0-d 1-d)
    t.ClearField("shared_memory")
    t.data = a.tobytes()
    return t


def from_tensor(t, copy=True, shm=None):
    """natgrad.v1.Tensor -> numpy array in native byte order (a writable copy
    by default). A tensor in shared memory is read through ``shm`` (a
    natgrad.shared_memory.Arena holding its region), always as a copy."""
    if t.dtype not in _NP:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    d = _NP[t.dtype]
    shape = tuple(t.shape)
    if t.HasField("shared_memory"):
        if shm is None:
            raise ValueError(f"tensor in shared memory region '{t.shared_memory.region}' and no "
                             "shared memory to read it from")
        if len(t.data):
            raise ValueError("tensor has both data and a shared memory span")
        return shm.read_array(t.shared_memory, d, shape)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(t.data) != n * d.itemsize:
        raise ValueError(f"tensor data has {len(t.data)} bytes, shape {list(shape)} "
                         f"of {d} needs {n * d.itemsize}")
    a = np.frombuffer(t.data, dtype=d).reshape(shape)
    return a.astype(d.newbyteorder("="), copy=True) if copy else a


def is_set(t):
    return t is not None and (t.dtype != 0 or len(t.shape) > 0 or len(t.data) > 0
                              or t.HasField("shared_memory"))
