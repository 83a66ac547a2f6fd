"""Build hook: generate the natgrad.v1 protobuf/gRPC stubs from ../../proto.

Everything else is declared in pyproject.toml. The stubs are generated with
Debian's `protoc` and `grpc_python_plugin` into natgrad/_proto/ (git-ignored)
by natgrad/_build_proto.py, which `scripts/setup-python` and CMake also run.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "natgrad"))
import _build_proto  # noqa: E402  (the module has no package-relative imports)


class BuildPyWithProto(build_py):
    def run(self):
        _build_proto.generate(quiet=True)
        super().run()
        # Copy the generated tree into the wheel (package_data would need the
        # files to exist when setup() is parsed).
        src = _build_proto.OUT_DIR
        dst = os.path.join(self.build_lib, "natgrad", "_proto")
        self.copy_tree(src, dst)


setup(cmdclass={"build_py": BuildPyWithProto})
