"""Exceptions: one class per gRPC status code, carrying the code and the
server's message. Client-side validation raises the same classes (with
``code = INVALID_ARGUMENT`` etc.) so callers catch one hierarchy.

    try:
        session.step(...)
    except natgrad.InvalidArgument as e:
        print(e.code, e.message)     # grpc.StatusCode.INVALID_ARGUMENT, "block 'fc1': ..."
"""
import grpc


class NatgradError(Exception):
    """Base class. ``code`` is a grpc.StatusCode, ``message`` the server's (or
    the client's) detail text, ``block``/``field`` name what was wrong where known."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message, code=None, *, block=None, field=None, rpc_error=None):
        self.message = message
        if code is not None:
            self.code = code
        self.block = block
        self.field = field
        self.rpc_error = rpc_error
        super().__init__(message)

    def __str__(self):
        return f"{self.code.name}: {self.message}"


class InvalidArgument(NatgradError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(NatgradError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(NatgradError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(NatgradError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(NatgradError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(NatgradError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(NatgradError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(NatgradError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NatgradError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(NatgradError):
    code = grpc.StatusCode.INTERNAL


class Cancelled(NatgradError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(NatgradError, NotImplementedError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Aborted(NatgradError):
    code = grpc.StatusCode.ABORTED


class DataLoss(NatgradError):
    """Steps this client was told were applied are gone from the server and
    cannot be sent again: after a restart the session is behind by more
    steps than the client kept (Session.max_replay_steps), or a step sent
    again answered differently than the first time. (A session gone
    altogether is NotFound.) Nothing was attached; restore from your own
    checkpoint (state_dict / export)."""
    code = grpc.StatusCode.DATA_LOSS


_BY_CODE = {c.code: c for c in (
    InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
    Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded, Internal,
    Cancelled, Unimplemented, Aborted, DataLoss)}


def from_rpc_error(err, context=""):
    """Maps a grpc.RpcError to the matching NatgradError subclass."""
    try:
        code = err.code()
        details = err.details() or ""
    except Exception:  # not a call object
        code, details = grpc.StatusCode.UNKNOWN, str(err)
    cls = _BY_CODE.get(code, NatgradError)
    msg = f"{context}: {details}" if context else details
    return cls(msg, code, rpc_error=err)
