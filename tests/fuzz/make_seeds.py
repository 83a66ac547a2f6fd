#!/usr/bin/env python3
"""Regenerates tests/fuzz/seeds/: checkpoints written by the real server's
checkpoint store for the golden wire vectors (CreateSession with
tests/wire/create_session_request.pb, then the Step of step_request.pb), as
the framed file and as its bare SessionSnapshot payload (fuzz_checkpoint
frames its input itself as well).

    tests/fuzz/make_seeds.py build/server/natgrad-server
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc

here = os.path.dirname(os.path.abspath(__file__))
wire = os.path.join(here, "..", "wire")
server, = sys.argv[1:]
tmp = tempfile.mkdtemp()
port_file = os.path.join(tmp, "port")
proc = subprocess.Popen([server, "--address=127.0.0.1:0", "--port_file=" + port_file,
                         "--inversion_backend=cpu", "--checkpoint_dir=" + tmp + "/ckpt",
                         "--checkpoint_every_steps=1"])
try:
    for _ in range(3000):
        if os.path.exists(port_file):
            break
        time.sleep(0.01)
    port = int(open(port_file).read())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    raw = dict(request_serializer=None, response_deserializer=None)
    create = channel.unary_unary("/natgrad.v1.OptimizerService/CreateSession", **raw)
    create(open(os.path.join(wire, "create_session_request.pb"), "rb").read(), timeout=30)
    step = channel.stream_stream("/natgrad.v1.OptimizerService/Step", **raw)
    responses = list(step(iter([open(os.path.join(wire, "step_request.pb"), "rb").read()]),
                          timeout=30))
    assert responses, "no step response"
finally:
    proc.kill()
    proc.wait()
out = os.path.join(here, "seeds")
os.makedirs(out, exist_ok=True)
for path in glob.glob(tmp + "/ckpt/*.ngckpt"):
    data = open(path, "rb").read()
    open(os.path.join(out, "checkpoint.ngckpt"), "wb").write(data)
    # 20-byte header, 32-byte SHA-256 trailer.
    open(os.path.join(out, "checkpoint_payload.pb"), "wb").write(data[20:-32])
    print("wrote", len(data), "byte checkpoint")
shutil.rmtree(tmp)
