#!/usr/bin/env python3
"""Writes natgrad's golden wire vectors (tests/wire/*.pb) from fixed values.

    .venv/bin/python tests/wire/generate.py           # (re)write the files
    .venv/bin/python tests/wire/generate.py --check   # exit 1 if they differ

Every message is built field by field here (not through natgrad's helper
functions), so a change to the helpers cannot silently change the vectors.
The scenario and every value are listed in tests/wire/README.md; the C++
test builds the same messages and compares bytes. Serialization is
deterministic (map keys sorted), which C++ reproduces with
SerializeToString under io::CodedOutputStream::SetSerializationDeterministic
(or MessageLite::SerializeToString after SetDefaultSerializationDeterministic).
"""
import argparse
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "client", "python"))

from google.protobuf import text_format  # noqa: E402

import natgrad  # noqa: E402,F401  (makes natgrad.v1 importable)
from natgrad.v1 import (blocks_pb2, optimizer_service_pb2, schedule_pb2, session_pb2,  # noqa: E402
                        step_pb2, tensor_pb2)

SESSION = "sessions/wire-golden-0001"


def f32(shape, values):
    """Tensor FLOAT32, data = values packed '<f' (row-major)."""
    return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=shape,
                             data=struct.pack(f"<{len(values)}f", *values))


def f64(shape, values):
    return tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT64, shape=shape,
                             data=struct.pack(f"<{len(values)}d", *values))


def const(v):
    return schedule_pb2.Schedule(constant=schedule_pb2.ConstantSchedule(value=v))


def create_session_request():
    kfac = blocks_pb2.BlockConfig(
        name="fc1", shape=[2, 4],
        kfac_dense=blocks_pb2.KfacDenseConfig(
            d_in=3, d_out=2, has_bias=True,
            learning_rate=const(0.25),
            damping=schedule_pb2.Schedule(joined=schedule_pb2.JoinedSchedule(
                schedules=[
                    schedule_pb2.Schedule(log_linear_warmup=schedule_pb2.LogLinearWarmupSchedule(
                        start=1e-4, end=1e-1, steps=10)),
                    schedule_pb2.Schedule(cosine_decay=schedule_pb2.CosineDecaySchedule(
                        init=0.1, steps=100, alpha=0.01)),
                ],
                boundaries=[10])),
            momentum=const(0.9),
            damping_mode=blocks_pb2.EIGEN_EXACT,
            ema_decay=0.95,
            inverse_period=5,
        ))
    adam = blocks_pb2.BlockConfig(
        name="bn.weight", shape=[2],
        adam=blocks_pb2.AdamConfig(learning_rate=const(0.001), beta1=0.9, beta2=0.999,
                                   epsilon=1e-8, weight_decay=const(0.01),
                                   decoupled_weight_decay=True))
    cfg = session_pb2.SessionConfig(
        blocks=[kfac, adam], state_dtype=tensor_pb2.FLOAT64,
        kl_clip=session_pb2.KlClipConfig(enabled=True, kappa=0.001),
        display_name="wire golden")
    return optimizer_service_pb2.CreateSessionRequest(config=cfg, session_id="wire-golden-0001")


def step_request():
    fc1 = step_pb2.BlockStep(
        name="fc1",
        gradient=f32([2, 4], [0.5, -1.0, 0.25, 2.0, -0.125, 1.5, 3.0, -4.0]),
        kfac=step_pb2.KfacStatistics(raw=step_pb2.RawKfacStatistics(
            activations=f32([2, 3], [1.0, 2.0, 3.0, -1.0, 0.5, 0.0]),
            output_gradients=f32([2, 2], [0.1, -0.2, 0.3, 0.4]))))
    bn = step_pb2.BlockStep(
        name="bn.weight",
        gradient=f32([2], [0.75, -0.5]),
        params=f32([2], [1.0, 1.0]))
    return step_pb2.StepRequest(session=SESSION, step=1, blocks=[fc1, bn], last=True, loss=2.5)


def step_response():
    fc1 = step_pb2.BlockUpdate(
        name="fc1",
        delta=f32([2, 4], [-0.0625, 0.125, -0.03125, -0.25, 0.015625, -0.1875, -0.375, 0.5]),
        hyperparameters={"learning_rate": 0.25, "damping": 1e-4, "momentum": 0.9,
                         "weight_decay": 0.0})
    bn = step_pb2.BlockUpdate(
        name="bn.weight",
        delta=f32([2], [-0.001, 0.001]),
        hyperparameters={"learning_rate": 0.001, "weight_decay": 0.01})
    return step_pb2.StepResponse(
        session=SESSION, step=1, updates=[fc1, bn], kl_clip_scale=0.5, damping=0.0,
        timing=step_pb2.StepTiming(server_micros=1234, compute_micros=1000, inversion_micros=250),
        replayed=False)


VECTORS = {
    "create_session_request": create_session_request,
    "step_request": step_request,
    "step_response": step_response,
}


def encode(msg):
    return msg.SerializeToString(deterministic=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    bad = 0
    for name, build in VECTORS.items():
        msg = build()
        data = encode(msg)
        txt = text_format.MessageToString(msg)
        pb_path = os.path.join(a.out, name + ".pb")
        txt_path = os.path.join(a.out, name + ".txtpb")
        if a.check:
            for path, want in ((pb_path, data),):  # .txtpb is for humans only
                try:
                    with open(path, "rb") as f:
                        have = f.read()
                except OSError:
                    have = None
                if have != want:
                    print(f"differs: {path}")
                    bad += 1
        else:
            with open(pb_path, "wb") as f:
                f.write(data)
            with open(txt_path, "w") as f:
                f.write(txt)
            print(f"wrote {pb_path} ({len(data)} bytes)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
