"""Generates the natgrad.v1 Python stubs from the .proto files.

    python -m natgrad._build_proto [--force] [--proto-dir DIR] [--out DIR]

Output layout (git-ignored, never edited by hand)::

    natgrad/_proto/natgrad/v1/{tensor,schedule,blocks,session,step,optimizer_service,admin_service}_pb2.py
    natgrad/_proto/natgrad/v1/{optimizer_service,admin_service}_pb2_grpc.py
    natgrad/_proto/gencode.json   which generator, and the protobuf/grpcio
                                  versions the generated code needs at run time

The generated code imports its siblings as ``from natgrad.v1 import
tensor_pb2``. ``natgrad/__init__.py`` appends ``_proto/natgrad`` to the
package's ``__path__``, so ``natgrad.v1`` resolves to these files without
rewriting imports and without a second top-level ``natgrad`` on sys.path.

Generators, in order of preference: ``grpc_tools.protoc`` (pip's
grpcio-tools, a build requirement of the package, so ``pip install`` needs no
protoc), then ``protoc`` + ``grpc_python_plugin`` found on PATH (Debian:
protobuf-compiler, protobuf-compiler-grpc). Code from a newer protoc refuses
to load under an older protobuf runtime, so when the stubs are generated for
the running interpreter (a source tree, ``runtime_check=True``) a generator
whose code this interpreter's protobuf/grpcio cannot load is skipped. A wheel
build (setup.py) takes the first generator and turns gencode.json into the
wheel's protobuf/grpcio requirements instead.

The .proto files come from the repository's proto/ (a source checkout) or
from proto/ next to the package (a built sdist, which copies them there).
Regenerates only when the .proto files or the generator changed (stamp).
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(PKG_DIR, "_proto")
# An sdist carries the .proto files at <sdist>/proto; a checkout has them at
# <repo>/proto, three levels above this file.
SDIST_PROTO_DIR = os.path.normpath(os.path.join(PKG_DIR, "..", "proto"))
REPO_PROTO_DIR = os.path.normpath(os.path.join(PKG_DIR, "..", "..", "..", "proto"))
PROTO_FILES = [
    "natgrad/v1/tensor.proto",
    "natgrad/v1/schedule.proto",
    "natgrad/v1/blocks.proto",
    "natgrad/v1/session.proto",
    "natgrad/v1/step.proto",
    "natgrad/v1/optimizer_service.proto",
    "natgrad/v1/admin_service.proto",
]
GENCODE_FILE = "gencode.json"
# What the package asks for when the generated code states no minimum (old protoc).
BASE_PROTOBUF = "3.21"
BASE_GRPCIO = "1.51"


def _has_protos(d):
    return all(os.path.isfile(os.path.join(d, p)) for p in PROTO_FILES)


def find_proto_dir():
    """The proto/ tree to generate from, or None (an installed package)."""
    for d in (SDIST_PROTO_DIR, REPO_PROTO_DIR):
        if _has_protos(d):
            return d
    return None


DEFAULT_PROTO_DIR = find_proto_dir() or REPO_PROTO_DIR


def _digest(proto_dir, generator):
    h = hashlib.sha256(generator.encode() + b"\0")
    for rel in PROTO_FILES:
        with open(os.path.join(proto_dir, rel), "rb") as f:
            h.update(rel.encode() + b"\0" + f.read())
    return h.hexdigest()


def read_gencode(out_dir=OUT_DIR):
    """gencode.json of a generated tree ({} when absent)."""
    try:
        with open(os.path.join(out_dir, GENCODE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_current(proto_dir=None, out_dir=OUT_DIR):
    proto_dir = proto_dir or find_proto_dir()
    info = read_gencode(out_dir)
    if not proto_dir or not info.get("stamp"):
        return False
    return info["stamp"] == _digest(proto_dir, info.get("generator", ""))


# -- generators -----------------------------------------------------------------
def _grpc_tools_generator():
    try:
        import grpc_tools
        from grpc_tools import protoc  # noqa: F401
    except ImportError:
        return None
    try:
        from grpc_tools import grpc_version
        ver = grpc_version.VERSION
    except ImportError:  # pragma: no cover - very old grpcio-tools
        ver = "?"
    inc = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")

    def cmd(proto_dir, out):
        return [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={proto_dir}",
                f"--proto_path={inc}", f"--python_out={out}", f"--grpc_python_out={out}"]
    return f"grpc_tools.protoc (grpcio-tools {ver})", cmd


def _path_protoc_generator():
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    if not protoc or not plugin:
        return None
    try:
        ver = subprocess.run([protoc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None

    def cmd(proto_dir, out):
        return [protoc, f"--proto_path={proto_dir}", f"--python_out={out}",
                f"--grpc_out={out}", f"--plugin=protoc-gen-grpc={plugin}"]
    return f"{protoc} ({ver}) + {plugin}", cmd


def generators():
    """Available generators as (description, command builder), preferred first."""
    return [g for g in (_grpc_tools_generator(), _path_protoc_generator()) if g is not None]


# -- versions ---------------------------------------------------------------------
def _version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])


def _scan_versions(out_dir):
    """The minimum runtime versions the generated code checks for (None: no check)."""
    v1 = os.path.join(out_dir, "natgrad", "v1")
    pb = grpc = None
    with open(os.path.join(v1, "step_pb2.py")) as f:
        text = f.read()
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                  r"\s*(\d+),\s*(\d+),\s*(\d+),", text)
    if m:
        pb = ".".join(m.groups())
    with open(os.path.join(v1, "optimizer_service_pb2_grpc.py")) as f:
        m = re.search(r"GRPC_GENERATED_VERSION\s*=\s*'([^']+)'", f.read())
    if m:
        grpc = m.group(1)
    return pb, grpc


def requirements(info):
    """install_requires for stubs described by gencode.json: protobuf at least
    the gencode version and of the same major (protobuf refuses newer gencode
    and warns about an older major), grpcio at least the grpc gencode version."""
    pb, grpc = info.get("protobuf"), info.get("grpcio")
    if pb:
        major = _version_tuple(pb)[0]
        pb_req = f"protobuf>={pb},<{major + 1}"
    else:
        pb_req = f"protobuf>={BASE_PROTOBUF}"
    return [pb_req, f"grpcio>={grpc or BASE_GRPCIO}"]


def runtime_problem(info):
    """Why this interpreter's protobuf/grpcio cannot load stubs described by
    `info`, or None (also None when protobuf/grpcio are not importable here)."""
    try:
        from google.protobuf import __version__ as pb_rt
        import grpc
        grpc_rt = grpc.__version__
    except ImportError:
        return None
    pb, gv = info.get("protobuf"), info.get("grpcio")
    if pb:
        need, have = _version_tuple(pb), _version_tuple(pb_rt)
        if have[0] != need[0] or have < need:
            return (f"the stubs from {info.get('generator')} need protobuf>={pb},<{need[0] + 1}; "
                    f"this interpreter has protobuf {pb_rt}")
    if gv and _version_tuple(grpc_rt) < _version_tuple(gv):
        return (f"the stubs from {info.get('generator')} need grpcio>={gv}; "
                f"this interpreter has grpcio {grpc_rt}")
    return None


# -- generation -------------------------------------------------------------------
def _generate_with(gen, proto_dir, tmp):
    desc, cmd = gen
    files = [os.path.join(proto_dir, p) for p in PROTO_FILES]
    res = subprocess.run(cmd(proto_dir, tmp) + files, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"natgrad: {desc} failed:\n{res.stderr}")
    for d in (tmp, os.path.join(tmp, "natgrad"), os.path.join(tmp, "natgrad", "v1")):
        with open(os.path.join(d, "__init__.py"), "w") as f:
            f.write("# Generated by natgrad._build_proto; do not edit.\n")
    pb, grpc = _scan_versions(tmp)
    info = {"generator": desc, "protobuf": pb, "grpcio": grpc,
            "stamp": _digest(proto_dir, desc)}
    with open(os.path.join(tmp, GENCODE_FILE), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return info


def generate(proto_dir=None, force=False, quiet=False, out_dir=OUT_DIR, runtime_check=True):
    """Generates the stubs into out_dir unless they are up to date; returns
    True when it generated. runtime_check: skip generators whose code this
    interpreter cannot load (see the module docstring)."""
    proto_dir = proto_dir or find_proto_dir()
    if not proto_dir or not _has_protos(proto_dir):
        if os.path.exists(os.path.join(out_dir, "natgrad", "v1", "step_pb2.py")):
            return False  # installed copy without the source tree: keep what is there
        raise RuntimeError(f"natgrad: no .proto files found (looked in {SDIST_PROTO_DIR} "
                           f"and {REPO_PROTO_DIR})")
    if not force and is_current(proto_dir, out_dir) and not (
            runtime_check and runtime_problem(read_gencode(out_dir))):
        return False
    gens = generators()
    if not gens:
        raise RuntimeError(
            "natgrad: cannot generate the protobuf stubs: neither grpcio-tools "
            "(pip install grpcio-tools) nor protoc + grpc_python_plugin on PATH "
            "(Debian: protobuf-compiler protobuf-compiler-grpc) is available")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Generate into a temp dir next to the target and swap it in, so that a
    # concurrent import never sees a half-written tree.
    problems = []
    for gen in gens:
        tmp = tempfile.mkdtemp(prefix="._proto.", dir=parent)
        try:
            info = _generate_with(gen, proto_dir, tmp)
            why = runtime_problem(info) if runtime_check else None
            if why:
                problems.append(why)
                continue
            old = None
            if os.path.exists(out_dir):
                old = tempfile.mkdtemp(prefix="._proto.old.", dir=parent)
                os.rename(out_dir, os.path.join(old, "p"))
            os.rename(tmp, out_dir)
            tmp = None
            if old:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"natgrad: generated stubs in {out_dir} with {info['generator']}")
        return True
    raise RuntimeError("natgrad: no generator makes stubs this interpreter can load: "
                       + "; ".join(problems))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--proto-dir", default=None)
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-runtime-check", action="store_true",
                   help="take the first generator even if this interpreter cannot load its code")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    generate(a.proto_dir, force=a.force, quiet=a.quiet, out_dir=a.out,
             runtime_check=not a.no_runtime_check)


if __name__ == "__main__":
    main()
