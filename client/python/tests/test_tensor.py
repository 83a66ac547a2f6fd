import struct

import numpy as np
import pytest

import natgrad
from natgrad.v1 import tensor_pb2


def test_float32_bytes_are_little_endian_row_major():
    x = np.array([[1.0, -2.0, 0.5], [3.0, 4.0, -0.25]], dtype=np.float32)
    t = natgrad.to_tensor(x)
    assert t.dtype == tensor_pb2.FLOAT32
    assert list(t.shape) == [2, 3]
    assert t.data == struct.pack("<6f", 1.0, -2.0, 0.5, 3.0, 4.0, -0.25)


def test_big_endian_and_non_contiguous_inputs_are_normalised():
    x = np.arange(12, dtype=">f8").reshape(3, 4).T  # big-endian, Fortran-ordered view
    t = natgrad.to_tensor(x)
    assert t.dtype == tensor_pb2.FLOAT64
    assert t.data == np.ascontiguousarray(x).astype("<f8").tobytes()
    np.testing.assert_array_equal(natgrad.from_tensor(t), x)


def test_round_trip_dtypes_and_scalar():
    for dt in (np.float32, np.float64):
        x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(dt)
        y = natgrad.from_tensor(natgrad.to_tensor(x))
        assert y.dtype == dt and y.shape == x.shape
        np.testing.assert_array_equal(x, y)
        y.flags.writeable  # a writable copy
        y[0, 0, 0] = 1
    s = natgrad.to_tensor(np.float64(3.5))
    assert list(s.shape) == [] and natgrad.from_tensor(s) == 3.5


def test_explicit_dtype_and_ints():
    t = natgrad.to_tensor(np.arange(3), dtype=np.float64)
    assert t.dtype == tensor_pb2.FLOAT64
    assert natgrad.to_tensor(np.arange(3)).dtype == tensor_pb2.FLOAT32


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    x = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    np.testing.assert_array_equal(natgrad.from_tensor(natgrad.to_tensor(x)), x.detach().numpy())


def test_bad_tensor_length_raises():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 2], data=b"\0" * 12)
    with pytest.raises(ValueError, match="12 bytes"):
        natgrad.from_tensor(t)
