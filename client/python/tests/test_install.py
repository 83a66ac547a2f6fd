"""The package installs anywhere: a fresh venv (no system site-packages), no
protoc on PATH, numpy/grpcio/protobuf as PyPI has them today.

    pytest -m install tests/test_install.py

Needs PyPI (pip's download cache is used, so a second run is mostly local) and
the server binary. Skips when PyPI is unreachable, unless
NATGRAD_REQUIRE_NETWORK=1 (then it fails).

1. ``pip install client/python numpy grpcio protobuf``: the stubs come from
   grpcio-tools in pip's isolated build environment; the wheel's protobuf /
   grpcio requirements come from the generated code, so the import works with
   no version warning (warnings are errors in the check script).
2. a real session (an SGD block, three steps) against $NATGRAD_SERVER from
   that venv, checked against w <- w - lr w.
3. a built sdist is self-contained: a wheel built from it alone (away from the
   repository's proto/) carries the same generated modules.
4. a protobuf older than the stubs need (installed over the requirements)
   makes ``import natgrad`` fail loudly, naming the versions.

The tests without the `install` marker are offline checks of the version
logic in natgrad/_build_proto.py.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import urllib.parse
import zipfile

import pytest

from natgrad import _build_proto

PKG = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
STUBS = ["tensor_pb2.py", "schedule_pb2.py", "blocks_pb2.py", "session_pb2.py", "step_pb2.py",
         "optimizer_service_pb2.py", "optimizer_service_pb2_grpc.py"]

CHECK = r"""
import json, sys, warnings
warnings.simplefilter("error")  # a protobuf gencode/runtime mismatch warning fails the check
import numpy as np, google.protobuf, grpc
import natgrad
from natgrad import blocks, _build_proto
out = {"natgrad": natgrad.__file__, "numpy": np.__version__, "grpcio": grpc.__version__,
       "protobuf": google.protobuf.__version__, "gencode": _build_proto.read_gencode(),
       "sys_path": sys.path}
srv = natgrad.LocalServer(sys.argv[1])
srv.start()
try:
    with natgrad.Client(srv.target) as c:
        s = c.create_session([blocks.sgd("w", [3], lr=0.25, momentum=0.0)])
        w = np.array([1.0, -2.0, 4.0])
        ws = []
        for _ in range(3):
            r = s.step({"w": {"gradient": w, "params": w}}, loss=float(w @ w))
            w = w + r["w"]
            ws.append(w.tolist())
        s.delete()
    out["ws"] = ws
finally:
    srv.stop()
    srv.cleanup()
print("RESULT " + json.dumps(out))
"""


def _index_host():
    url = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port or (443 if u.scheme == "https" else 80)


@pytest.fixture(scope="module")
def network():
    host, port = _index_host()
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        msg = f"package index {host}:{port} unreachable ({e})"
        if os.environ.get("NATGRAD_REQUIRE_NETWORK") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _run(cmd, env, cwd, timeout=600):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n"
                               f"{r.stderr[-4000:]}")
    return r.stdout


@pytest.fixture(scope="module")
def venv(network, tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    vdir = root / "venv"
    # The base interpreter, not this (possibly --system-site-packages) venv's.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(vdir)], check=True, timeout=300)
    bindir = str(vdir / "bin")
    # PATH holds only the venv: no protoc, no grpc_python_plugin (Debian's
    # /bin is /usr/bin, so even it must go).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=bindir, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    assert shutil.which("protoc", path=bindir) is None
    assert shutil.which("grpc_python_plugin", path=bindir) is None
    return {"root": root, "python": str(vdir / "bin" / "python"), "env": env}


def test_requirements_follow_the_generated_code():
    assert _build_proto.requirements({"protobuf": "7.35.1", "grpcio": "1.85.1"}) == [
        "protobuf>=7.35.1,<8", "grpcio>=1.85.1"]
    # Old protoc writes no runtime check: the package's floor applies.
    assert _build_proto.requirements({}) == ["protobuf>=3.21", "grpcio>=1.51"]


def test_runtime_problem_names_the_versions():
    import google.protobuf
    import grpc
    assert _build_proto.runtime_problem({}) is None
    assert _build_proto.runtime_problem({"protobuf": google.protobuf.__version__,
                                         "grpcio": grpc.__version__}) is None
    why = _build_proto.runtime_problem({"generator": "g", "protobuf": "99.1.0", "grpcio": None})
    assert "protobuf>=99.1.0,<100" in why and google.protobuf.__version__ in why
    why = _build_proto.runtime_problem({"generator": "g", "protobuf": None, "grpcio": "99.0.0"})
    assert "grpcio>=99.0.0" in why and grpc.__version__ in why


def test_generate_into_a_folder_this_interpreter_loads(tmp_path):
    out = str(tmp_path / "_proto")
    assert _build_proto.generate(force=True, quiet=True, out_dir=out)
    info = _build_proto.read_gencode(out)
    assert info["generator"] and _build_proto.runtime_problem(info) is None
    assert _build_proto.is_current(out_dir=out)
    assert not _build_proto.generate(quiet=True, out_dir=out)  # up to date: nothing to do
    for s in STUBS:
        assert os.path.isfile(os.path.join(out, "natgrad", "v1", s))


@pytest.mark.install
def test_pip_install_without_protoc_runs_a_session(venv, server_binary):
    py, env = venv["python"], venv["env"]
    _run([py, "-m", "pip", "install", "-q", PKG, "numpy", "grpcio", "protobuf"], env, str(venv["root"]))
    out = _run([py, "-c", CHECK, os.path.abspath(server_binary)], env, str(venv["root"]))
    res = json.loads(out.split("RESULT ", 1)[1])
    site = os.path.realpath(os.path.join(os.path.dirname(py), ".."))
    assert os.path.realpath(res["natgrad"]).startswith(site), res["natgrad"]
    # No system site-packages: numpy/grpc/protobuf are the venv's own.
    assert not any(p.startswith("/usr/lib/python3/dist-packages") for p in res["sys_path"])
    gen = res["gencode"]
    assert gen["generator"].startswith("grpc_tools.protoc"), gen
    # The installed runtime satisfies what the generated code checks.
    assert _build_proto._version_tuple(res["protobuf"]) >= \
        _build_proto._version_tuple(gen["protobuf"])
    assert _build_proto._version_tuple(res["grpcio"]) >= \
        _build_proto._version_tuple(gen["grpcio"])
    # SGD without momentum: w <- w - 0.25 w, three times.
    import numpy as np
    w = np.array([1.0, -2.0, 4.0])
    want = [(w * 0.75 ** k).tolist() for k in (1, 2, 3)]
    np.testing.assert_allclose(res["ws"], want, rtol=1e-6)


@pytest.mark.install
def test_sdist_is_self_contained(venv):
    py, env, root = venv["python"], venv["env"], venv["root"]
    _run([py, "-m", "pip", "install", "-q", "build"], env, str(root))
    dist = root / "dist"
    _run([py, "-m", "build", "--sdist", "--outdir", str(dist), PKG], env, str(root))
    (sdist,) = dist.glob("natgrad-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = t.getnames()
    top = names[0].split("/")[0]
    for p in ("tensor", "schedule", "blocks", "session", "step", "optimizer_service"):
        assert f"{top}/proto/natgrad/v1/{p}.proto" in names, names
    # Build the wheel from the sdist alone (pip unpacks it in a temp dir, away
    # from the repository's proto/).
    wheels = root / "wheels"
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(sdist)], env, str(root))
    (whl,) = wheels.glob("natgrad-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                    if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
        gencode = json.loads(z.read("natgrad/_proto/gencode.json"))
    for s in STUBS:
        assert f"natgrad/_proto/natgrad/v1/{s}" in names, sorted(names)
    assert gencode["generator"].startswith("grpc_tools.protoc"), gencode
    assert any(r.startswith("protobuf") and gencode["protobuf"] in r for r in requires), requires
    assert any(r.startswith("grpcio") and gencode["grpcio"] in r for r in requires), requires


@pytest.mark.install
def test_too_old_protobuf_fails_loudly(venv):
    py, env, root = venv["python"], venv["env"], venv["root"]
    out = _run([py, "-c", "from natgrad import _build_proto as b; import json; "
                "print(json.dumps(b.read_gencode()))"], env, str(root))
    gen = json.loads(out.strip().splitlines()[-1])
    if not gen.get("protobuf"):
        pytest.skip(f"stubs from {gen.get('generator')} state no protobuf minimum")
    major = _build_proto._version_tuple(gen["protobuf"])[0]
    # Over the wheel's requirement on purpose (pip warns, installs anyway).
    _run([py, "-m", "pip", "install", "-q", f"protobuf<{major}"], env, str(root))
    r = subprocess.run([py, "-c", "import natgrad"], env=env, cwd=str(root), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and f"protobuf>={gen['protobuf']}" in r.stderr, r.stderr[-3000:]
