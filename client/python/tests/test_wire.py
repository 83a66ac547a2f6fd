"""Golden wire vectors (tests/wire): decode, check, re-encode byte for byte."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import natgrad
from natgrad import blocks, schedules
from natgrad.v1 import blocks_pb2, optimizer_service_pb2, step_pb2, tensor_pb2

WIRE = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "wire"))


def load(name, cls):
    with open(os.path.join(WIRE, name + ".pb"), "rb") as f:
        data = f.read()
    msg = cls.FromString(data)
    return data, msg


@pytest.mark.parametrize("name,cls", [
    ("create_session_request", optimizer_service_pb2.CreateSessionRequest),
    ("step_request", step_pb2.StepRequest),
    ("step_response", step_pb2.StepResponse),
])
def test_round_trip_is_byte_identical(name, cls):
    data, msg = load(name, cls)
    assert msg.SerializeToString(deterministic=True) == data
    # A parse of the re-encoding is equal, too (no unknown fields were kept).
    assert cls.FromString(msg.SerializeToString(deterministic=True)) == msg
    assert not msg.UnknownFields() if hasattr(msg, "UnknownFields") else True


def test_generator_is_in_sync():
    r = subprocess.run([sys.executable, os.path.join(WIRE, "generate.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_session_request_fields_and_helpers():
    data, msg = load("create_session_request", optimizer_service_pb2.CreateSessionRequest)
    assert msg.session_id == "wire-golden-0001"
    fc1, bn = msg.config.blocks
    assert list(fc1.shape) == [2, 4] and fc1.kfac_dense.damping_mode == blocks_pb2.EIGEN_EXACT
    # natgrad's own helpers build the same bytes.
    cfg = blocks.session_config([
        blocks.kfac_dense("fc1", 3, 2, lr=0.25, momentum=0.9, damping_mode="eigen",
                          ema_decay=0.95, inverse_period=5,
                          damping=schedules.joined([schedules.log_linear_warmup(1e-4, 1e-1, 10),
                                                    schedules.cosine_decay(0.1, 100, 0.01)], [10])),
        blocks.adam("bn.weight", [2], lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.01, decoupled_weight_decay=True),
    ], state_dtype="float64", kl_clip=0.001, display_name="wire golden")
    req = optimizer_service_pb2.CreateSessionRequest(config=cfg, session_id="wire-golden-0001")
    assert req.SerializeToString(deterministic=True) == data


def test_step_request_tensors_and_session_encoder():
    data, msg = load("step_request", step_pb2.StepRequest)
    assert msg.step == 1 and msg.last and msg.HasField("loss") and msg.loss == 2.5
    g = msg.blocks[0].gradient
    assert g.dtype == tensor_pb2.FLOAT32 and list(g.shape) == [2, 4]
    assert g.data == struct.pack("<8f", 0.5, -1.0, 0.25, 2.0, -0.125, 1.5, 3.0, -4.0)
    np.testing.assert_array_equal(natgrad.from_tensor(msg.blocks[0].kfac.raw.activations),
                                  np.array([[1, 2, 3], [-1, 0.5, 0]], np.float32))
    # The Session's request builder gives the same bytes for the same inputs.
    _, create = load("create_session_request", optimizer_service_pb2.CreateSessionRequest)
    from natgrad.v1 import session_pb2
    info = session_pb2.Session(name="sessions/wire-golden-0001", config=create.config)
    sess = natgrad.Session(client=_FakeClient(), info=info)
    f32 = np.float32
    reqs = sess.build_requests({
        "fc1": {"gradient": np.array([[0.5, -1.0, 0.25, 2.0], [-0.125, 1.5, 3.0, -4.0]], f32),
                "activations": np.array([[1, 2, 3], [-1, 0.5, 0]], f32),
                "output_gradients": np.array([[0.1, -0.2], [0.3, 0.4]], f32)},
        "bn.weight": {"gradient": np.array([0.75, -0.5], f32), "params": np.ones(2, f32)},
    }, loss=2.5)
    assert len(reqs) == 1
    assert reqs[0].SerializeToString(deterministic=True) == data


def test_step_response_decodes_through_step_result():
    data, msg = load("step_response", step_pb2.StepResponse)
    r = natgrad.StepResult(msg)
    assert r.step == 1 and r.kl_clip_scale == 0.5 and not r.replayed
    np.testing.assert_array_equal(r["bn.weight"], np.array([-0.001, 0.001], np.float32))
    assert r["fc1"].shape == (2, 4) and r["fc1"].dtype == np.float32
    assert r.hyperparameters["fc1"] == {"damping": 1e-4, "learning_rate": 0.25, "momentum": 0.9,
                                        "weight_decay": 0.0}
    # Map entries are serialized sorted by key with deterministic=True.
    hp = msg.updates[0].SerializeToString(deterministic=True)
    assert hp.index(b"damping") < hp.index(b"learning_rate") < hp.index(b"momentum")


class _FakeClient:
    max_message_bytes = 1 << 30
