"""The generated natgrad.v1 modules, (re)generated on first import in a source tree.

An installed package ships its stubs (generated at build time, see
natgrad/_build_proto.py); when they cannot load under the installed
protobuf/grpcio (e.g. protobuf was downgraded after installing natgrad), the
ImportError says which versions the stubs need.
"""


def _load():
    from natgrad.v1 import tensor_pb2, schedule_pb2, blocks_pb2, session_pb2, step_pb2  # noqa: F401
    from natgrad.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc  # noqa: F401
    from natgrad.v1 import admin_service_pb2, admin_service_pb2_grpc  # noqa: F401


def _forget():
    import sys
    for k in [k for k in sys.modules if k.startswith("natgrad.v1.")]:
        del sys.modules[k]


try:
    _load()
except Exception as _first:  # ImportError, protobuf's VersionError, grpc's RuntimeError
    from natgrad import _build_proto
    _forget()
    if _build_proto.find_proto_dir() is None:
        info = _build_proto.read_gencode()
        why = _build_proto.runtime_problem(info) if info else None
        need = " ".join(f"'{r}'" for r in _build_proto.requirements(info))
        raise ImportError(f"natgrad: cannot load the generated stubs: {why or repr(_first)}. Install "
                          f"what they need (pip install {need}) or rebuild natgrad in this "
                          "environment (pip install --force-reinstall <natgrad source>)") from _first
    try:
        # Source tree: stubs missing, stale, or from a generator this
        # interpreter cannot load -> regenerate with one it can.
        _build_proto.generate(quiet=True, force=not isinstance(_first, ModuleNotFoundError))
    except RuntimeError as e:
        raise ImportError(f"{e}\n(run `python -m natgrad._build_proto` or scripts/setup-python)") from None
    import importlib
    importlib.invalidate_caches()
    _load()

from natgrad.v1 import tensor_pb2, schedule_pb2, blocks_pb2, session_pb2, step_pb2  # noqa: E402,F401
from natgrad.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc  # noqa: E402,F401
from natgrad.v1 import admin_service_pb2, admin_service_pb2_grpc  # noqa: E402,F401
