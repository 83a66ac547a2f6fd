"""The generated natgrad.v1 modules, generated on first import in a source tree."""
try:
    from natgrad.v1 import tensor_pb2, schedule_pb2, blocks_pb2, session_pb2, step_pb2  # noqa: F401
    from natgrad.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc  # noqa: F401
except ImportError:
    from natgrad import _build_proto
    try:
        _build_proto.generate(quiet=True)
    except RuntimeError as e:
        raise ImportError(f"{e}\n(run `python -m natgrad._build_proto` or scripts/setup-python)") from None
    import importlib
    importlib.invalidate_caches()
    from natgrad.v1 import tensor_pb2, schedule_pb2, blocks_pb2, session_pb2, step_pb2  # noqa: F401
    from natgrad.v1 import optimizer_service_pb2, optimizer_service_pb2_grpc  # noqa: F401
