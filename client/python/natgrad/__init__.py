"""natgrad: Python client of the natgrad natural-gradient optimizer service.

    import natgrad
    from natgrad import blocks, schedules

    client = natgrad.Client("localhost:50051")
    session = client.create_session([
        blocks.kfac_dense("fc1", d_in=64, d_out=32, lr=0.1, damping=1e-3),
        blocks.adam("bn.weight", shape=[32], lr=1e-3),
    ])
    updates = session.step({"fc1": {"gradient": gW, "activations": a,
                                    "output_gradients": g}}, loss=loss)
    W += updates["fc1"]

Framework adapters: ``natgrad.torch.KFAC`` (PyTorch), ``natgrad.jax``
(pytrees), ``natgrad.gaussian`` (variational Gaussian blocks).

The protobuf messages live in ``natgrad.v1`` (generated from proto/ into
natgrad/_proto/natgrad/v1 by ``python -m natgrad._build_proto``; that folder is
appended to this package's ``__path__`` so the generated
``from natgrad.v1 import tensor_pb2`` imports work unchanged).
"""
import os as _os

__version__ = "0.1.0"

__path__.append(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "_proto", "natgrad"))  # noqa: F821

from natgrad import _pb  # noqa: E402,F401  (generates the stubs on first use in a source tree)
from natgrad.errors import (  # noqa: E402
    NatgradError, InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted,
    Unauthenticated, PermissionDenied, Unavailable, DeadlineExceeded, Internal,
    AlreadyExists, Cancelled, Unimplemented, Aborted, DataLoss,
)
from natgrad.tensor import to_tensor, from_tensor  # noqa: E402
from natgrad import schedules, blocks, gaussian  # noqa: E402
from natgrad.client import Client, Session, StepResult, GaussianResult, RetryPolicy  # noqa: E402
from natgrad.server import LocalServer, find_server_binary  # noqa: E402

__all__ = [
    "Client", "Session", "StepResult", "GaussianResult", "RetryPolicy",
    "LocalServer", "find_server_binary", "schedules", "blocks", "gaussian", "to_tensor", "from_tensor",
    "NatgradError", "InvalidArgument", "NotFound", "FailedPrecondition", "ResourceExhausted",
    "Unauthenticated", "PermissionDenied", "Unavailable", "DeadlineExceeded", "Internal",
    "AlreadyExists", "Cancelled", "Unimplemented", "Aborted", "DataLoss",
]
