"""Build hook: the natgrad.v1 protobuf/gRPC stubs and the requirements they imply.

Everything else is declared in pyproject.toml. natgrad/_build_proto.py
generates the stubs with grpcio-tools (a [build-system] requirement, so no
protoc is needed) or, without it, with protoc + grpc_python_plugin on PATH.

- wheel: the stubs are generated afresh into a staging folder (never the
  source tree's natgrad/_proto, which belongs to the source checkout's own
  interpreter) and copied into the wheel as natgrad/_proto/. Generated code
  checks the protobuf/grpcio runtime it runs under, so the wheel's
  requirements are derived from it (e.g. protobuf>=7.35.1,<8 and
  grpcio>=1.85.1 for stubs from grpcio-tools 1.85.1).
- sdist: the .proto files are copied into the archive as proto/natgrad/v1/,
  so a wheel builds from the sdist alone.
- editable installs (the dev venv): the stubs are generated into the source
  tree, checked against this interpreter's protobuf (see _build_proto); an
  import under an incompatible protobuf regenerates them (natgrad/_pb.py).
"""
import atexit
import os
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "natgrad"))
import _build_proto  # noqa: E402  (the module has no package-relative imports)

# googleapis-common-protos: google.rpc.Status, to read SessionMoved redirects
# from the grpc-status-details-bin trailer (natgrad/client.py).
BASE_REQUIRES = ["numpy>=1.21", "googleapis-common-protos>=1.56"]

_staged = {}


def _editable():
    # pip's PEP 660 hook runs setup.py with "editable_wheel"; the old path with "develop".
    return any(a in ("editable_wheel", "develop") for a in sys.argv[1:])


def _stage():
    """Generates the stubs once per setup.py run into a temp folder."""
    if "dir" not in _staged:
        d = tempfile.mkdtemp(prefix="natgrad-stubs.")
        atexit.register(shutil.rmtree, d, True)
        out = os.path.join(d, "_proto")
        _build_proto.generate(force=True, quiet=True, out_dir=out, runtime_check=False)
        _staged["dir"] = out
    return _staged["dir"]


def _install_requires():
    if _build_proto.find_proto_dir() is None:
        # Metadata-only run from an unpacked wheel-like tree: use its stubs.
        return BASE_REQUIRES + _build_proto.requirements(_build_proto.read_gencode())
    return BASE_REQUIRES + _build_proto.requirements(_build_proto.read_gencode(_stage()))


class BuildPyWithProto(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False) or _editable():
            _build_proto.generate(quiet=True)
            return
        dst = os.path.join(self.build_lib, "natgrad", "_proto")
        shutil.rmtree(dst, ignore_errors=True)  # stale files of an earlier build
        src = _stage() if _build_proto.find_proto_dir() else _build_proto.OUT_DIR
        self.copy_tree(src, dst)


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        proto_dir = _build_proto.find_proto_dir()
        if proto_dir is None:
            raise RuntimeError("natgrad sdist: the .proto files were not found")
        for rel in _build_proto.PROTO_FILES:
            dst = os.path.join(base_dir, "proto", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(proto_dir, rel), dst)


setup(cmdclass={"build_py": BuildPyWithProto, "sdist": SdistWithProto},
      install_requires=_install_requires())
