"""Client and Session: sessions of server-side optimizer state and the Step
stream (docs/architecture.md).

A Session keeps the step number, one bidirectional Step stream, and retries:
when the stream drops (UNAVAILABLE, a reset or cancelled stream, the server
restarting) it reconnects and sends the *same* step number again; the server
answers a step it already applied with its cached response and changes no
state, so every step takes effect exactly once. A FAILED_PRECONDITION
"stream already open" right after a drop (the server has not yet noticed the
old stream is gone) is retried too, for a short time. Everything else
(INVALID_ARGUMENT, NOT_FOUND, step-order errors, ...) raises the matching
natgrad.NatgradError subclass at once; the step counter is then unchanged,
so the step can be corrected and sent again.

Steps that are acknowledged but not yet durable on the server survive a
server crash too. Every response carries the session's ``durable_step`` (the
last step whose checkpoint is written; -1 when the server has no
--checkpoint_dir). The Session keeps the requests of the steps after it, with
each response, at most ``max_replay_steps`` of them and ``max_replay_bytes``
of requests and responses (1000 steps, 1 GiB by default). After
a reconnect it asks the server where the session is (GetSession); if it is
behind the last acknowledged step (a SIGKILL between checkpoints with
--checkpoint_every_steps=N loses up to N-1 steps on the server) it sends the
kept steps again in order, checks each response is bit-identical to the
first (timing, ``replayed`` and ``durable_step`` aside), and then continues.
When the session is gone it raises natgrad.NotFound, when it is further
behind than the kept steps reach natgrad.DataLoss, and attaches nothing.

Several replicas (docs/replicas.md): the client picks the session id before
CreateSession (a random one when none is given) and sends it on every call
for the session as ``natgrad-session-key`` metadata, plus
``natgrad-replica`` once it knows which replica holds the session (from
Session.replica or a redirect), so a router (deploy/nginx) sends every call
to that replica. A drained replica answers FAILED_PRECONDITION with a
natgrad.v1.SessionMoved detail (google.rpc.Status in the
``grpc-status-details-bin`` trailer); the client follows it transparently:
behind a router it sets the new replica header, talking to servers directly
it connects to SessionMoved.address (``redirects=`` on Client), reopens the
Step stream and replays what the new replica lacks through the machinery
above. UNAVAILABLE (a replica restarting, a session frozen for a move) is
retried with exponential backoff within RetryPolicy.deadline_s.
"""
import collections
import dataclasses
import logging
import queue
import random
import secrets
import threading
import time

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import api_implementation

from natgrad import errors
from natgrad._pb import (admin_service_pb2 as admin_pb2, optimizer_service_pb2 as svc_pb2,
                         optimizer_service_pb2_grpc as svc_grpc, session_pb2, step_pb2,
                         tensor_pb2)
from natgrad import shared_memory as _shm
from natgrad.blocks import session_config as _session_config
from natgrad.tensor import _NP, as_array, from_tensor, is_set, to_tensor

try:  # googleapis-common-protos: the google.rpc.Status of error details
    from google.rpc import status_pb2 as _rpc_status_pb2
except ImportError:  # pragma: no cover  (a dependency; only redirects need it)
    _rpc_status_pb2 = None

log = logging.getLogger("natgrad")

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20   # the server's default --max_message_bytes
DEFAULT_SPLIT_BYTES = 32 << 20          # one StepRequest carries at most this much
# Non-durable steps a Session keeps for replay. A server checkpointing every N
# steps needs N - 1; the cap only bites for time-based or shutdown-only
# checkpoints.
DEFAULT_MAX_REPLAY_STEPS = 1000
DEFAULT_MAX_REPLAY_BYTES = 1 << 30


@dataclasses.dataclass
class RetryPolicy:
    """How a Session rides out dropped streams.

    max_attempts: sends of one step or unary call (first try included); 0:
      no limit but deadline_s.
    initial_backoff/max_backoff/multiplier: exponential backoff with jitter.
    deadline_s: give up retrying one step or call after this long.
    stream_open_s: how long FAILED_PRECONDITION "stream already open" is retried.
    max_redirects: SessionMoved redirects followed for one step or call.
    """
    max_attempts: int = 10
    initial_backoff: float = 0.02
    max_backoff: float = 2.0
    multiplier: float = 2.0
    deadline_s: float = 60.0
    stream_open_s: float = 10.0
    max_redirects: int = 8

    def backoff(self, attempt):
        b = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        return b * (0.5 + random.random() * 0.5)

    def exhausted(self, attempt, start):
        """True when `attempt` failed tries since `start` (monotonic) are all there may be."""
        return ((self.max_attempts and attempt >= self.max_attempts)
                or time.monotonic() - start > self.deadline_s)

    def sleep(self, attempt, start):
        """Backs off before try attempt+1, never past the deadline."""
        left = self.deadline_s - (time.monotonic() - start)
        time.sleep(max(0.0, min(self.backoff(attempt), left)))


@dataclasses.dataclass
class GaussianResult:
    """A Gaussian block's update, in the block's parametrisation."""
    param1: np.ndarray
    param2: np.ndarray
    delta1: np.ndarray = None
    delta2: np.ndarray = None
    direction1: np.ndarray = None
    direction2: np.ndarray = None
    gamma_used: float = 0.0
    halvings: int = 0

    def transposed(self):
        """The same update with the first parts as [dim, copies] (GPflow's q_mu layout)."""
        t = lambda a: None if a is None else np.asarray(a).reshape(-1, a.shape[-1]).T  # noqa: E731
        return dataclasses.replace(self, param1=t(self.param1), delta1=t(self.delta1),
                                   direction1=t(self.direction1))


class StepResult(dict):
    """name -> numpy delta (the client does w += delta), or a GaussianResult
    for Gaussian blocks. Attributes: step, replayed, kl_clip_scale, damping,
    hyperparameters (name -> {hyperparameter: value}), timing, durable_step
    (the last step that survives a server restart; -1 without server
    checkpoints), response (the StepResponse message).

    With shared memory the arrays are copies out of the reply buffer (safe to
    keep); the tensors of ``response`` name their spans in it, which the
    session writes over two steps later."""

    def __init__(self, response, shm=None):
        super().__init__()
        self.response = response
        self.step = response.step
        self.replayed = response.replayed
        self.durable_step = response.durable_step
        self.kl_clip_scale = response.kl_clip_scale
        self.damping = response.damping
        self.timing = response.timing
        self.hyperparameters = {}
        for u in response.updates:
            self.hyperparameters[u.name] = dict(u.hyperparameters)
            if u.HasField("gaussian"):
                g = u.gaussian
                f = lambda t: from_tensor(t, shm=shm) if is_set(t) else None  # noqa: E731
                self[u.name] = GaussianResult(
                    param1=from_tensor(g.param1, shm=shm), param2=from_tensor(g.param2, shm=shm),
                    delta1=f(g.delta1), delta2=f(g.delta2),
                    direction1=f(g.direction1), direction2=f(g.direction2),
                    gamma_used=g.gamma_used, halvings=g.halvings)
            else:
                self[u.name] = from_tensor(u.delta, shm=shm)


def _session_name(name):
    if isinstance(name, Session):
        return name.name
    if isinstance(name, session_pb2.Session):
        return name.name
    return name if name.startswith("sessions/") else f"sessions/{name}"


def _session_id(name):
    return _session_name(name).split("/", 1)[-1]


def new_session_id():
    """A random session id ([a-z0-9-]{4,63}, what the server accepts)."""
    return "s-" + secrets.token_hex(10)


def session_moved(e):
    """The natgrad.v1.SessionMoved detail of a failed call (a grpc.RpcError),
    or None: FAILED_PRECONDITION with a google.rpc.Status in the
    grpc-status-details-bin trailer holding one (docs/replicas.md)."""
    if not hasattr(e, "code") or e.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001  (an RpcError that is not a call)
        return None
    raw = next((v for k, v in trailers if k == "grpc-status-details-bin"), None)
    if raw is None:
        return None
    if _rpc_status_pb2 is None:
        raise errors.FailedPrecondition(
            f"{e.details()} (a SessionMoved redirect: install googleapis-common-protos to have "
            "natgrad follow it)")
    moved_type = admin_pb2.SessionMoved
    status = _rpc_status_pb2.Status.FromString(raw)
    for d in status.details:
        if d.Is(moved_type.DESCRIPTOR):
            m = moved_type()
            d.Unpack(m)
            return m
    return None


def _channel_credentials(tls):
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, dict):
        def load(v):
            if v is None or isinstance(v, bytes):
                return v
            with open(v, "rb") as f:
                return f.read()
        return grpc.ssl_channel_credentials(
            root_certificates=load(tls.get("root_certificates") or tls.get("ca")),
            private_key=load(tls.get("private_key") or tls.get("key")),
            certificate_chain=load(tls.get("certificate_chain") or tls.get("cert")))
    raise TypeError("tls must be None, True, a dict of PEM paths/bytes "
                    "(ca, cert, key) or grpc.ChannelCredentials")


class Client:
    """A connection to natgrad-server.

    target: "host:port". token: bearer token sent as `authorization` metadata.
    tls: None (plaintext), True (system roots), {"ca": path, "cert": path,
    "key": path} (mTLS), or grpc.ChannelCredentials. timeout: seconds for
    unary calls. retry: RetryPolicy for Step streams and unary calls.
    max_replay_steps, max_replay_bytes: the most non-durable steps, and
    bytes of their requests and responses, each Session keeps to send again after a server
    restart (0: keep none; module docstring).
    redirects: how a SessionMoved redirect is followed. "router": `target`
    is a router (deploy/nginx) and only the natgrad-replica header changes;
    "direct": connect to the address in the redirect (servers without a
    router); "auto" (default): the header first, and the address when the
    same redirect comes back (nothing routed on the header).
    shared_memory: the default of the sessions this client opens (Session):
    False, True, "auto" (shared memory when the server takes it, else
    inline), or the initial bytes of each shared-memory region.
    """

    def __init__(self, target, token=None, tls=None, *, timeout=30.0, retry=None,
                 max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, options=(), server_name=None,
                 max_replay_steps=DEFAULT_MAX_REPLAY_STEPS,
                 max_replay_bytes=DEFAULT_MAX_REPLAY_BYTES, redirects="auto",
                 shared_memory=False):
        if redirects not in ("auto", "router", "direct"):
            raise ValueError(f"redirects must be 'auto', 'router' or 'direct', got {redirects!r}")
        self.redirects = redirects
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_replay_steps = int(max_replay_steps)
        self.max_replay_bytes = int(max_replay_bytes)
        self.max_message_bytes = int(max_message_bytes)
        self.shared_memory = _check_shared_memory(shared_memory)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                # Reconnect quickly after a server restart.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        opts.extend(options)
        self._channel_opts, self._creds = opts, _channel_credentials(tls)
        self._channel = self._open_channel(target)
        self.stub = svc_grpc.OptimizerServiceStub(self._channel)
        # Routing (module docstring): session id -> [replica, address] (the
        # address only once a redirect was followed directly), and channels
        # to replicas reached directly.
        self._routes = {}
        self._direct = {}
        self._routes_lock = threading.Lock()

    def _open_channel(self, target):
        return (grpc.secure_channel(target, self._creds, options=self._channel_opts) if self._creds
                else grpc.insecure_channel(target, options=self._channel_opts))

    # -- routing --------------------------------------------------------------
    def replica_of(self, session):
        """The replica name this client last learned for a session ('' if none)."""
        with self._routes_lock:
            return self._routes.get(_session_id(session), ["", None])[0]

    def _learn_replica(self, sid, replica):
        if replica:
            with self._routes_lock:
                r = self._routes.setdefault(sid, ["", None])
                if r[0] != replica:
                    r[0], r[1] = replica, None

    def _route(self, sid):
        """(stub, metadata, target) for a call about session `sid` (None: no session)."""
        if sid is None:
            return self.stub, self._metadata, self.target
        with self._routes_lock:
            replica, address = self._routes.get(sid, ("", None))
            md = self._metadata + (("natgrad-session-key", sid),)
            if replica:
                md += (("natgrad-replica", replica),)
            if not address:
                return self.stub, md, self.target
            stub = self._direct.get(address)
            if stub is None:
                ch = self._open_channel(address)
                stub = self._direct[address] = (ch, svc_grpc.OptimizerServiceStub(ch))
            return stub[1], md, address

    def _await_channel(self, target, timeout):
        """Waits (at most `timeout` s) for the channel to `target` to be READY
        before a retry. A sync gRPC channel only makes progress on its
        connection while some thread waits on it; a client whose threads all
        sleep in backoff between fail-fast calls has been seen to never finish
        connecting (a TCP connect nobody polled, for a minute, under heavy
        load). Waiting here drives the connect; a timeout just lets the call
        fail and be retried."""
        with self._routes_lock:
            ch = self._direct[target][0] if target in self._direct else self._channel
        fut = grpc.channel_ready_future(ch)
        try:
            fut.result(timeout=max(0.01, min(timeout, self.timeout)))
        except grpc.FutureTimeoutError:
            fut.cancel()

    def _follow(self, sid, moved, what):
        """Points session `sid` where a SessionMoved redirect says (module docstring)."""
        with self._routes_lock:
            r = self._routes.setdefault(sid, ["", None])
            again = r[0] == moved.replica and not r[1]
            if self.redirects == "direct" or (self.redirects == "auto" and again):
                if not moved.address:
                    raise errors.FailedPrecondition(
                        f"{what}: session moved to replica {moved.replica!r}, which this client "
                        f"cannot reach: the redirect names no address and {self.target} did not "
                        "route on the natgrad-replica header")
                r[0], r[1] = moved.replica, moved.address
            else:
                r[0], r[1] = moved.replica, None
        log.info("natgrad: %s: session %s moved to replica %s (%s)", what, sid, moved.replica,
                 moved.address or "no address")

    # -- plumbing -------------------------------------------------------------
    def _unary(self, method, request, what, idempotent=False, session=None, state=None):
        """One unary call. session: the session id it is about (routing
        metadata, redirects followed). idempotent: UNAVAILABLE is retried with
        backoff within the RetryPolicy. state: a dict; "retried" is set when
        an UNAVAILABLE try was retried (the first may have taken effect)."""
        pol = self.retry
        start = time.monotonic()
        attempt = hops = 0
        while True:
            stub, md, target = self._route(session)
            try:
                if attempt == 0:
                    return getattr(stub, method)(request, timeout=self.timeout, metadata=md)
                # A retry waits for the channel to connect (_await_channel)
                # instead of failing fast, within what is left of the deadline.
                left = pol.deadline_s - (time.monotonic() - start)
                return getattr(stub, method)(request, timeout=max(0.01, min(self.timeout, left)),
                                             metadata=md, wait_for_ready=True)
            except grpc.RpcError as e:
                moved = session_moved(e) if session is not None else None
                if moved is not None and hops < pol.max_redirects:
                    hops += 1
                    self._follow(session, moved, what)
                    continue
                attempt += 1
                # A retry that waited for the channel and ran out of time is
                # the server still being unavailable.
                waited_out = attempt > 1 and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                retryable = e.code() == grpc.StatusCode.UNAVAILABLE or waited_out
                if idempotent and waited_out and pol.exhausted(attempt, start):
                    raise errors.Unavailable(
                        f"{what}: natgrad server at {target} unavailable: no answer within the "
                        f"retry deadline ({pol.deadline_s}s, {attempt} attempts)") from None
                if idempotent and retryable and not pol.exhausted(attempt, start):
                    if state is not None:
                        state["retried"] = True
                    pol.sleep(attempt, start)
                    continue
                raise self._error(e, what, target) from None

    def _error(self, e, what, target=None):
        err = errors.from_rpc_error(e, what)
        if err.code == grpc.StatusCode.UNAVAILABLE:
            err.message = f"{what}: natgrad server at {target or self.target} unavailable: {e.details()}"
            err.args = (err.message,)
        return err

    def wait_ready(self, timeout=10.0):
        """Blocks until the channel is connected (raises Unavailable after timeout)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(f"natgrad server at {self.target} not reachable "
                                     f"within {timeout}s") from None

    # -- sessions -------------------------------------------------------------
    def create_session(self, config, session_id=None, *, shared_memory=None, **session_kw):
        """config: a SessionConfig, or a list of BlockConfig (from
        natgrad.blocks) plus session_config() keywords (kl_clip=...,
        adaptive_damping=..., state_dtype=..., display_name=...).
        session_id: [a-z0-9-]{4,63}; a random one when None (chosen here, so
        a router can place the session before it exists).
        shared_memory: steps through POSIX shared memory with a server on
        this host started with --shared_memory (Session; None: the client's
        default)."""
        if not isinstance(config, session_pb2.SessionConfig):
            config = _session_config(config, **session_kw)
        elif session_kw:
            raise TypeError("session keywords are only accepted with a list of blocks")
        sid = session_id or new_session_id()
        req = svc_pb2.CreateSessionRequest(config=config, session_id=sid)
        what = f"CreateSession sessions/{sid}"
        state = {}
        try:
            info = self._unary("CreateSession", req, what, idempotent=True, session=sid,
                               state=state)
        except errors.AlreadyExists:
            if not state.get("retried"):
                raise
            # An UNAVAILABLE try that did create it (its answer was lost):
            # ours if it has our config and no step yet.
            info = self.get_session_info(sid)
            if info.config != config or info.last_step > 0:
                raise
        return Session(self, info, shared_memory=shared_memory)

    def get_session(self, name, *, shared_memory=None):
        """Attaches to an existing session; steps continue from its last_step."""
        return Session(self, self.get_session_info(name), shared_memory=shared_memory)

    def get_session_info(self, name):
        info = self._unary("GetSession", svc_pb2.GetSessionRequest(name=_session_name(name)),
                           f"GetSession {_session_name(name)}", idempotent=True,
                           session=_session_id(name))
        self._learn_replica(_session_id(name), info.replica)
        return info

    def list_sessions(self, page_size=0):
        """All sessions visible to this client (follows page tokens)."""
        out, token = [], ""
        while True:
            r = self._unary("ListSessions", svc_pb2.ListSessionsRequest(
                page_size=page_size, page_token=token), "ListSessions", idempotent=True)
            out.extend(r.sessions)
            token = r.next_page_token
            if not token:
                return out

    def delete_session(self, name):
        state = {}
        try:
            self._unary("DeleteSession", svc_pb2.DeleteSessionRequest(name=_session_name(name)),
                        f"DeleteSession {_session_name(name)}", idempotent=True,
                        session=_session_id(name), state=state)
        except errors.NotFound:
            if not state.get("retried"):  # else: the lost-answer try deleted it
                raise

    def export_session(self, name):
        return self._unary("ExportSession", svc_pb2.ExportSessionRequest(name=_session_name(name)),
                           f"ExportSession {_session_name(name)}", idempotent=True,
                           session=_session_id(name))

    def import_session(self, snapshot, session_id=None, *, shared_memory=None):
        sid = session_id or (_session_id(snapshot.name) if snapshot.name else None)
        info = self._unary("ImportSession", svc_pb2.ImportSessionRequest(
            snapshot=snapshot, session_id=session_id or ""), "ImportSession", session=sid)
        return Session(self, info, shared_memory=shared_memory)

    def restore_session(self, snapshot, *, shared_memory=None):
        """A Session continuing from `snapshot` (a SessionSnapshot from
        export_session, or its serialized bytes): imported (keeping its id)
        when the server does not have the session, e.g. a fresh server with
        an empty checkpoint directory; attached to when it does, after
        checking that the server's session is at the snapshot's step with the
        same config. Raises InvalidArgument for bytes that do not parse and
        FailedPrecondition for a session at another step or config."""
        if not isinstance(snapshot, session_pb2.SessionSnapshot):
            raw = bytes(snapshot)
            snapshot = session_pb2.SessionSnapshot()
            try:
                snapshot.ParseFromString(raw)
            except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
                raise errors.InvalidArgument(f"session snapshot does not parse: {e}",
                                             field="snapshot") from None
        name, step = snapshot.name, snapshot.last_step
        try:
            info = self.get_session_info(name)
        except errors.NotFound:
            session = self.import_session(snapshot, shared_memory=shared_memory)
            if session.name != name or session.next_step != step + 1:
                raise errors.Internal(f"ImportSession of {name} at step {step} gave {session.name} "
                                      f"at step {session.next_step - 1}") from None
            return session
        if info.last_step != step:
            raise errors.FailedPrecondition(
                f"session {name} on the server is at step {info.last_step}, the checkpoint at step "
                f"{step}: refusing to continue from a different state (delete the server's session "
                "to import the checkpoint)")
        if info.config != snapshot.config:
            raise errors.FailedPrecondition(f"session {name} on the server has another config "
                                            "than the checkpoint")
        return Session(self, info, shared_memory=shared_memory)

    def close(self):
        self._channel.close()
        with self._routes_lock:
            for ch, _ in self._direct.values():
                ch.close()
            self._direct.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Stream:
    """One Step call fed from a queue (gRPC pulls requests on its own thread)."""

    _END = object()

    def __init__(self, stub, metadata):
        self._q = queue.Queue()
        self.call = stub.Step(self._requests(), metadata=metadata)

    def _requests(self):
        while True:
            m = self._q.get()
            if m is self._END:
                return
            yield m

    def send(self, msg):
        self._q.put(msg)

    def recv(self):
        return next(self.call)

    def close(self):
        self._q.put(self._END)

    def cancel(self):
        self._q.put(self._END)
        self.call.cancel()


_GRADIENT_SPACES = {
    "expectation": step_pb2.EXPECTATION_GRADIENT,
    "parametrization": step_pb2.PARAMETRIZATION_GRADIENT,
}

_FISHER_FORMS = {
    "full": step_pb2.LIKELIHOOD_FISHER_FULL,
    "diagonal": step_pb2.LIKELIHOOD_FISHER_DIAGONAL,
    "shared": step_pb2.LIKELIHOOD_FISHER_SHARED,
}


def _retry_reason(e):
    """Why a failed Step call may be retried with the same step number, or None."""
    code = e.code() if hasattr(e, "code") else None
    details = (e.details() if hasattr(e, "details") else "") or ""
    low = details.lower()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        return "drop"
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and (
            "rst_stream" in low or "stream removed" in low or "reset" in low
            or "goaway" in low or "socket closed" in low):
        return "drop"
    if code == grpc.StatusCode.FAILED_PRECONDITION and "already open" in low:
        return "stream_open"
    return None


_TRIU = {}
_TENSOR_NAME = tensor_pb2.Tensor.DESCRIPTOR.full_name
# Whether build_requests builds each block inside its request message. With
# the cpp protobuf backend (Debian's) that saves a copy of every block: for
# the MNIST autoencoder's 46 MB step, building 45-62 -> 26-28 ms (serializing
# 13-21 ms either way). With upb (PyPI's wheels) a request built that way serializes
# at half the speed of one assembled from standalone blocks (97 vs 48 ms),
# more than the copy saves, so there blocks are built alone and copied in.
_BUILD_IN_PLACE = api_implementation.Type() != "upb"
_TENSOR_ITEMSIZE = {tensor_pb2.FLOAT32: 4, tensor_pb2.FLOAT64: 8}


def _tensor_size_bound(t, inline=False):
    """_size_bound of a natgrad.v1.Tensor from its dtype and shape alone.
    Reading ``t.data`` from Python copies the bytes (cpp protobuf and upb
    both hand out a new bytes object), about 5 ms per 57 MB here, so the
    data's length is taken from the shape: every tensor of a request is
    built by to_tensor, which writes exactly prod(shape) elements of dtype
    (or none, with a shared-memory span). ``inline``: the bound of the
    tensor with a span's bytes inline instead. None for another dtype."""
    size = _TENSOR_ITEMSIZE.get(t.dtype)
    if size is None:
        return None
    for d in t.shape:
        size *= max(int(d), 0)
    n = _LEN + 10 * len(t.shape) + _VARINT  # shape (packed), dtype
    if t.HasField("shared_memory") and not inline:  # then data is empty (to_tensor)
        return n + _LEN + _LEN + len(t.shared_memory.region.encode()) + 2 * _VARINT
    return n + _LEN + size


# Largest encoded size of a field (tag of a field number < 2048, 2 bytes)
# without its payload: a length-delimited field's tag and length (< 2^35),
# a varint field whole, a fixed-width field's tag.
_LEN, _VARINT, _TAG = 2 + 5, 2 + 10, 2
_FIXED = {FieldDescriptor.TYPE_DOUBLE: 8, FieldDescriptor.TYPE_FIXED64: 8,
          FieldDescriptor.TYPE_SFIXED64: 8, FieldDescriptor.TYPE_FLOAT: 4,
          FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4}


def _scalar_bound(fd, v):
    """Encoded size bound of one non-message value of field ``fd``."""
    if fd.type in (fd.TYPE_BYTES, fd.TYPE_STRING):
        return _LEN + (len(v) if isinstance(v, bytes) else len(v.encode()))
    width = _FIXED.get(fd.type)
    return _VARINT if width is None else _TAG + width


def _bytes_of(msg, inline=False):
    """_size_bound, or the exact size where there is no bound."""
    b = _size_bound(msg, inline)
    return msg.ByteSize() if b is None else b


def _size_bound(msg, inline=False):
    """An upper bound on msg.ByteSize() that reads no tensor bytes: upb's
    ByteSize encodes the whole message, a full pass over every tensor, and
    build_requests only needs to know whether a block or a request may be
    near a limit; Session.replay_bytes adds them up. ``inline``: the bound
    with every shared-memory span's bytes inline. None for a tensor of
    another dtype (then ByteSize)."""
    if msg.DESCRIPTOR.full_name == _TENSOR_NAME:
        return _tensor_size_bound(msg, inline)
    n = 0
    for fd, v in msg.ListFields():
        # protobuf >= 6 (upb) dropped FieldDescriptor.label; is_repeated replaces it.
        rep = (fd.is_repeated if hasattr(fd, "is_repeated")
               else fd.label == fd.LABEL_REPEATED)
        if fd.type == fd.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                key = fd.message_type.fields_by_name["key"]
                value = fd.message_type.fields_by_name["value"]
                for k, val in v.items():
                    if value.type == value.TYPE_MESSAGE:
                        b = _size_bound(val, inline)
                        if b is None:
                            return None
                        b += _LEN
                    else:
                        b = _scalar_bound(value, val)
                    n += _LEN + _scalar_bound(key, k) + b
                continue
            for m in (v if rep else (v,)):
                b = _size_bound(m, inline)
                if b is None:
                    return None
                n += _LEN + b
        else:
            # (repeated: packed or not, one length prefix more covers both)
            n += sum(_scalar_bound(fd, x) for x in (v if rep else (v,))) + (_LEN if rep else 0)
    return n


def _needs_inlining(reqs):
    return any(r.HasField("reply_buffer") or _shm.has_spans(r) for r in reqs)


class _KeptStep:
    """An acknowledged step held for replay until the server reports it
    durable. A step that went through shared memory keeps its requests and
    response as they were (spans, small) and one copy of the spans' bytes
    (SpanCopies in the session's CopyPool); the inline messages a replay
    sends and compares are made from those only when a replay happens."""

    # No reference back to the session: a cycle would keep a dropped
    # session's replay buffer (up to max_replay_bytes) until the cyclic GC.
    __slots__ = ("step", "_reqs", "_resp", "_copies", "nbytes")

    def __init__(self, session, step, reqs, resp):
        self.step = step
        self._reqs, self._resp = list(reqs), resp
        self._copies = None
        arena = session._shm
        if arena is not None and (_needs_inlining(self._reqs) or _shm.has_spans(resp)):
            self._copies = arena.copy_spans(self._reqs + [resp], session._copy_pool,
                                            f"Step {session.name} step {step}")
        # From the sizes (no pass over the bytes): the inline form's bound,
        # or, for a tensor of a dtype with no bound, the message's own size
        # (spans only) plus the copies.
        bounds = [_size_bound(m, inline=True) for m in self._reqs + [resp]]
        if all(b is not None for b in bounds):
            self.nbytes = sum(bounds)
        else:
            self.nbytes = (sum(m.ByteSize() for m in self._reqs + [resp])
                           + (self._copies.nbytes if self._copies is not None else 0))

    def requests(self, session):
        """The step's requests as a replay sends them: values inline, no reply buffer."""
        if self._copies is None:
            return self._reqs
        return session._inline_for_replay(self.step, self._reqs, source=self._copies)

    def answer(self, session):
        """The step's first response with its values inline (what a replay
        must answer; a response that came inline is kept as it came)."""
        if self._copies is None or not _shm.has_spans(self._resp):
            return self._resp
        return _shm.materialize(self._resp, self._copies, f"Step {session.name} step {self.step}")

    def release(self, pool):
        if self._copies is not None:
            self._copies.release(pool)
            self._copies = None


def _same_answer(replayed, first):
    """Whether a replayed step answered what it answered the first time:
    every field but timing, replayed and durable_step, which legitimately
    differ (both hold their tensors' values inline)."""
    a, b = step_pb2.StepResponse(), step_pb2.StepResponse()
    a.CopyFrom(replayed)
    b.CopyFrom(first)
    for m in (a, b):
        for f in ("timing", "replayed", "durable_step"):
            m.ClearField(f)
    return a == b


def _triu_indices(d):
    """Row-major upper-triangle indices of a d x d matrix (the packed order)."""
    if d not in _TRIU:
        _TRIU[d] = np.triu_indices(d)
    return _TRIU[d]


def _check_shared_memory(v):
    if v is None or v is False:
        return False
    if v is True or v == "auto":
        return v
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return int(v)
    raise ValueError("shared_memory must be True, False, \"auto\" or a positive region size in "
                     f"bytes, got {v!r}")


def _shared_memory_refusal(err):
    """Whether `err` is a server refusing a step only for its shared memory:
    started without --shared_memory, or unable to open the client's regions
    (another host or container). Either refusal applied nothing."""
    if isinstance(err, errors.FailedPrecondition):
        return "names shared memory" in err.message
    if isinstance(err, errors.InvalidArgument):
        return ("which the server cannot open" in err.message
                or "which the server cannot map" in err.message)
    return False


class _SpanWriter:
    """to_tensor's writer for one step: tensors go into that step's slot."""

    __slots__ = ("arena", "step")

    def __init__(self, arena, step):
        self.arena, self.step = arena, step

    def write(self, array, dtype, span):
        self.arena.write(self.step, array, dtype, span)


def _nbytes(t, itemsize=None):
    n = 1
    for d in t.shape:
        n *= int(d)
    return n * (itemsize or (_NP[t.dtype].itemsize if t.dtype in _NP else 8))


def _reply_estimate(reqs):
    """Reply-buffer bytes a step's update tensors take (server-aligned): a
    delta per block in its gradient's shape and dtype; a Gaussian block's
    parameters, deltas and directions at 8 bytes a value (an upper bound)."""
    need = 0
    for r in reqs:
        for bs in r.blocks:
            if bs.HasField("gaussian"):
                g = bs.gaussian
                for t in (g.param1, g.param2):
                    need += 3 * _shm.align_up(_nbytes(t, 8))
            elif bs.HasField("gradient"):
                need += _shm.align_up(_nbytes(bs.gradient))
    return need


def _reply_bytes(resp):
    """Reply-buffer bytes `resp`'s update tensors take, inline ones included."""
    return sum(_shm.align_up(_nbytes(t)) for t in _shm.tensors(resp) if is_set(t))


class _OpenStep:
    """A streamed step begun on a Session: its messages so far, and how many
    of them are queued on which stream."""

    __slots__ = ("step", "reqs", "stream", "sent", "gpflow")

    def __init__(self, step):
        self.step = step
        self.reqs = []
        self.stream = None
        self.sent = 0
        self.gpflow = set()


class Session:
    """A session on the server: steps, info, delete.

    Use ``step(inputs, loss=None)``: inputs maps block name ->
      * K-FAC blocks: {"gradient": dL/dW of the mean loss [d_out, d_in(+1)],
        "activations": [rows, d_in], "output_gradients": [rows, d_out]} or
        the reduced form {"a_factor", "g_factor", "num_examples"} (square,
        sent as packed upper triangles unless "packed": False, or already
        packed: 1-D, d(d+1)/2 values, the upper triangle row by row); optional
        "params" (needed for weight decay). Convolutions (block locations
        T > 1): rows = n*T unfolded patches; reduced A = abar^T abar / n,
        G = g^T g / (n*T), num_examples = n.
      * SGD/Adam blocks: {"gradient": ..., "params": ...} or just the gradient array.
      * Gaussian blocks: {"param1", "param2", "grad1", "grad2",
        "gradient_space": "expectation" | "parametrization", "layout"}.
        gradient_space is required (the server reads an unset field as
        expectation gradients; natgrad.gaussian.step_input defaults to
        "parametrization"). Means are [L, M] = [copies, dim]; with
        layout="gpflow" param1/grad1 are GPflow's q_mu layout [M, L] and the
        result's param1/delta1/direction1 come back as [M, L] too. When
        copies == dim > 1 layout must be given (the shapes cannot tell).
      * or a natgrad.v1.BlockStep message, sent as is.
    Arrays may be numpy, torch or jax arrays (float32 or float64).
    Returns a StepResult (name -> delta, or GaussianResult).

    A step may also be streamed, its blocks sent as they become ready:
    ``begin_step()``, ``send_blocks(inputs)`` any number of times,
    ``finish_step(inputs=None, loss=None)`` (natgrad.torch sends each layer
    as backward produces it this way).

    ``shared_memory=True`` (a server on this host with --shared_memory;
    docs/shared_memory.md): every request tensor is copied once, converting
    its dtype on the way, into a POSIX shared-memory region the session owns
    (/dev/shm/natgrad-...) and sent as a span, and the server writes the
    update tensors into the session's reply buffer instead of the message
    (natgrad.shared_memory: two slots by step parity, so a step in flight
    keeps its spans while the next is built; regions regrow when a step
    outgrows them and are unlinked by close() and at exit). The results are
    the same bytes as inline; the replay buffer keeps inline copies. An int
    instead of True: the first size of each region in bytes.
    ``shared_memory="auto"``: the same, until the server refuses a step for
    its shared memory (started without --shared_memory, or on another host
    or in another container, so that it cannot open the regions); that step
    is then sent again inline at once (a refused step applied nothing), and
    so is every later one. ``Session.shared_memory`` tells which is in use.
    """

    def __init__(self, client, info, shared_memory=None):
        self.client = client
        self.name = info.name
        self.id = info.name.split("/", 1)[-1]
        if hasattr(client, "_learn_replica"):  # (test doubles build requests without one)
            client._learn_replica(self.id, info.replica)
        self.config = info.config
        self.blocks = {b.name: b for b in info.config.blocks}
        self.next_step = info.last_step + 1
        self.split_bytes = DEFAULT_SPLIT_BYTES
        self.validate = True
        self._stream = None
        self._lock = threading.Lock()
        # Test hook: called as hook(event, session, stream, step) at "sent"
        # (the whole step is queued, no response read yet).
        self._test_hook = None
        self._gpflow_blocks = set()
        self._open = None  # the streamed step begun and not finished (_OpenStep)
        self.retries = 0  # reconnects so far (for monitoring/tests)
        self.redirects = 0  # SessionMoved redirects followed by steps (monitoring/tests)
        # Replay of non-durable steps (module docstring): step -> _KeptStep for
        # the steps after the server's durable step, oldest first.
        self.max_replay_steps = getattr(client, "max_replay_steps", DEFAULT_MAX_REPLAY_STEPS)
        self.max_replay_bytes = getattr(client, "max_replay_bytes", DEFAULT_MAX_REPLAY_BYTES)
        self._acked = info.last_step  # the last step the server confirmed to this object
        self._durable = info.durable_step
        self._kept = collections.OrderedDict()
        self._kept_bytes = 0
        self._copy_pool = _shm.CopyPool()  # buffers of kept steps' shared-memory bytes
        self._warned_cap = False
        self._resync = False  # set when a stream is dropped: check the server on reopening
        self.replayed_steps = 0  # steps sent again after a server restart (monitoring/tests)
        if shared_memory is None:
            shared_memory = getattr(client, "shared_memory", False)
        shared_memory = _check_shared_memory(shared_memory)
        self._shm = None
        # "auto": shared memory until the server refuses it, then inline for
        # good (kept answers hold values, so steps kept before the switch
        # still compare with their replays).
        self._shm_auto = shared_memory == "auto"
        if shared_memory:
            self._shm = _shm.Arena(shared_memory if isinstance(shared_memory, int)
                                   and shared_memory is not True else 0)

    @property
    def shared_memory(self):
        """Whether steps go through shared memory (Session docstring)."""
        return self._shm is not None

    @property
    def shared_memory_regions(self):
        """The names of the shared-memory objects the session holds now."""
        return self._shm.region_names if self._shm is not None else []

    def __repr__(self):
        return f"<natgrad.Session {self.name} next_step={self.next_step} blocks={list(self.blocks)}>"

    @property
    def replica(self):
        """The replica holding the session, as last learned ('' from a server without a name)."""
        return self.client.replica_of(self.id)

    def _open_stream(self):
        stub, md, _ = self.client._route(self.id)
        self._stream = _Stream(stub, md)
        return self._stream

    # -- lifecycle ------------------------------------------------------------
    def info(self):
        return self.client.get_session_info(self.name)

    def export(self):
        """The session's SessionSnapshot (ExportSession), checked to be at
        this client's last applied step; Client.restore_session continues it."""
        snap = self.client.export_session(self.name)
        if snap.last_step != self.next_step - 1:
            raise errors.FailedPrecondition(
                f"session {self.name}: the server exported step {snap.last_step} but this client "
                f"has applied step {self.next_step - 1} (another client stepping the same session?)")
        return snap

    def delete(self):
        self.close()
        self.client.delete_session(self.name)

    def close(self):
        """Half-closes the Step stream (the session stays on the server) and
        unlinks the session's shared memory (made again by a later step)."""
        with self._lock:
            self._open = None  # the server drops a step the stream ends inside of
            self._drop_stream(cancel=False)
            if self._shm is not None:
                self._shm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _drop_stream(self, cancel=True):
        s, self._stream = self._stream, None
        if s is not None:
            self._resync = True
            if cancel:
                s.cancel()
            else:
                s.close()

    # -- replay of non-durable steps --------------------------------------------
    def _reset(self, info):
        """Continues from the server's `info` (a Session message): the kept
        steps belong to another history and are dropped."""
        self.next_step = info.last_step + 1
        self._acked = info.last_step
        self._durable = info.durable_step
        for kept in self._kept.values():
            kept.release(self._copy_pool)
        self._kept.clear()
        self._kept_bytes = 0
        self._copy_pool.clear()

    @property
    def durable_step(self):
        """The last step the server reported durable (-1: it keeps no checkpoints)."""
        return self._durable

    @property
    def replay_steps(self):
        """Steps kept for replay (those after durable_step)."""
        return len(self._kept)

    @property
    def replay_bytes(self):
        """Bytes of the kept requests and responses (the buffer's memory, roughly)."""
        return self._kept_bytes

    def _keep(self, step, reqs, resp):
        """Records an acknowledged step; forgets every kept step now durable
        (all of them when the server keeps no checkpoints)."""
        self._acked = max(self._acked, step)
        self._durable = resp.durable_step
        # Durable steps first, so the new step's copies reuse their buffers.
        while self._kept and next(iter(self._kept)) <= self._durable:
            self._forget(next(iter(self._kept)))
        if self.max_replay_steps > 0 and 0 <= self._durable < step and step not in self._kept:
            kept = _KeptStep(self, step, reqs, resp)
            self._kept[step] = kept
            self._kept_bytes += kept.nbytes
        while self._kept:
            first = next(iter(self._kept))
            within = (len(self._kept) <= self.max_replay_steps
                      and self._kept_bytes <= self.max_replay_bytes)
            if self._durable >= 0 and first > self._durable and within:
                break
            if self._durable >= 0 and first > self._durable and not self._warned_cap:
                self._warned_cap = True
                log.warning("natgrad: %s: more than max_replay_steps=%d steps or max_replay_bytes=%d "
                            "bytes are not durable on the server (durable step %d): the oldest can no "
                            "longer be sent again after a server restart", self.name,
                            self.max_replay_steps, self.max_replay_bytes, self._durable)
            self._forget(first)

    def _forget(self, step):
        kept = self._kept.pop(step)
        self._kept_bytes -= kept.nbytes
        kept.release(self._copy_pool)

    def _reopen(self, step):
        """Opens a stream after a drop: asks where the server's session is and
        sends again the acknowledged steps it lost, checking each answer."""
        acked = self._acked
        stub, md, target = self.client._route(self.id)
        try:
            info = stub.GetSession(svc_pb2.GetSessionRequest(name=self.name),
                                   timeout=self.client.timeout, metadata=md)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise  # a drop: the retry loop decides
            durable = ("the server keeps no checkpoints (durable_step -1)" if self._durable < 0
                       else f"its last durable step was {self._durable}")
            raise errors.NotFound(
                f"Step {self.name} step {step}: the session is gone from the server at "
                f"{target} (restarted without its checkpoint, or deleted) after this "
                f"client had step {acked} acknowledged; {durable}. Nothing was attached: restore "
                "from your own checkpoint") from None
        behind = info.last_step
        need = list(range(behind + 1, acked + 1))
        missing = [t for t in need if t not in self._kept]
        if missing:
            held = (f"steps {next(iter(self._kept))}..{next(reversed(self._kept))}" if self._kept
                    else "no steps")
            raise errors.DataLoss(
                f"Step {self.name} step {step}: the server's session is at step {behind} (durable "
                f"step {info.durable_step}) but this client had step {acked} acknowledged and "
                f"holds {held} to send again, not step {missing[0]}; the server lost "
                f"{acked - behind} acknowledged steps. Nothing was attached: restore from your "
                "own checkpoint (or raise max_replay_steps / checkpoint more often)")
        self.client._learn_replica(self.id, info.replica)
        stream = self._open_stream()
        if not need:
            return stream
        log.warning("natgrad: %s: the server's session is at step %d, this client at %d: sending "
                    "steps %d..%d again", self.name, behind, acked, need[0], need[-1])
        for t in need:
            reqs, answer = self._kept[t].requests(self), self._kept[t].answer(self)
            for r in reqs:
                stream.send(r)
            resp = stream.recv()  # a drop here: the retry loop reopens and resumes
            if resp.step != t or not _same_answer(resp, answer):
                self._drop_stream()
                raise errors.DataLoss(
                    f"Step {self.name}: step {t} sent again after a server restart answered "
                    f"differently than the first time (response for step {resp.step}); the "
                    "server's state no longer matches this client's: restore from your own checkpoint")
            self._keep(t, reqs, resp)
            self.replayed_steps += 1
        return stream

    # -- building requests ----------------------------------------------------
    def _err(self, block, field, msg):
        where = f"block '{block}'" + (f", field '{field}'" if field else "")
        return errors.InvalidArgument(f"step {self.next_step}: {where}: {msg}", block=block, field=field)

    def _array(self, block, field, x, shape=None, alt_shape=None, finite=True):
        try:
            a = as_array(x)
        except Exception as e:  # noqa: BLE001
            raise self._err(block, field, f"cannot convert {type(x).__name__} to an array: {e}") from None
        if a.dtype.kind not in "fiu":
            raise self._err(block, field, f"expected a float array, got dtype {a.dtype}")
        if self.validate:
            if shape is not None and list(a.shape) != list(shape) and (
                    alt_shape is None or list(a.shape) != list(alt_shape)):
                want = f"{list(shape)}" + (f" or {list(alt_shape)}" if alt_shape is not None else "")
                raise self._err(block, field, f"shape {list(a.shape)}, expected {want}")
            if finite and a.size and not np.all(np.isfinite(a)):
                raise self._err(block, field, "contains NaN or Inf")
        return a

    def _block_step(self, name, x, step=None, out=None):
        """The BlockStep of block `name` for step `step` (default: next_step;
        a caller building a step ahead, natgrad.torch's pipeline, says which:
        with shared memory the number picks the region's slot). ``out``: an
        empty BlockStep to build it in (a request's, so that its bytes are
        written once: with upb protobuf, PyPI's, putting a built block into
        a request copies it at about 1 GB/s)."""
        if isinstance(x, step_pb2.BlockStep):
            if x.name and x.name != name:
                raise self._err(name, "name", f"BlockStep message names block '{x.name}'")
            if out is not None:
                out.CopyFrom(x)
                out.name = name
                return out
            if x.name == name:
                # Used as it is: nothing downstream changes it (the request
                # messages take copies), and a copy of natgrad.torch's raw
                # statistics is 57 MB a step for the MNIST autoencoder.
                return x
            bs = step_pb2.BlockStep()
            bs.CopyFrom(x)
            bs.name = name
            return bs
        cfg = self.blocks.get(name)
        if cfg is None:
            raise self._err(name, None, f"no such block in session {self.name} "
                            f"(blocks: {sorted(self.blocks)})")
        if not isinstance(x, dict):
            x = {"gradient": x}
        kind = cfg.WhichOneof("kind")
        known = {"gradient", "params", "activations", "output_gradients", "a_factor", "g_factor",
                 "num_examples", "packed", "param1", "param2", "grad1", "grad2", "gradient_space",
                 "layout", "dtype", "compositional"}
        extra = set(x) - known
        if extra:
            raise self._err(name, sorted(extra)[0], f"unknown input field(s) {sorted(extra)}")
        bs = step_pb2.BlockStep(name=name) if out is None else out
        bs.name = name
        w = None
        if self._shm is not None:
            w = _SpanWriter(self._shm, self.next_step if step is None else step)
        shape = list(cfg.shape)
        dtype = x.get("dtype")
        if kind == "gaussian":
            return self._gaussian_step(bs, name, cfg.gaussian, x, dtype, w)
        if kind == "gaussian_diag":
            return self._gaussian_diag_step(bs, name, cfg.gaussian_diag, x, dtype, w)
        if x.get("gradient") is None:
            raise self._err(name, "gradient", "missing")
        grad = self._array(name, "gradient", x["gradient"], shape)
        if dtype is None:
            dtype = np.float64 if (grad.dtype.kind == "f" and grad.dtype.itemsize == 8) else np.float32
        to_tensor(grad, dtype, out=bs.gradient, shm=w)
        if x.get("params") is not None:
            to_tensor(self._array(name, "params", x["params"], shape), dtype, out=bs.params, shm=w)
        if kind in ("kfac_dense", "ekfac"):  # the same statistics (ekfac: raw only, server-checked)
            k = getattr(cfg, kind)
            din, dout, b = k.d_in, k.d_out, int(k.has_bias)
            has_raw = x.get("activations") is not None or x.get("output_gradients") is not None
            has_red = x.get("a_factor") is not None or x.get("g_factor") is not None
            if has_raw and has_red:
                raise self._err(name, "activations", "give raw (activations, output_gradients) "
                                "or reduced (a_factor, g_factor) statistics, not both")
            if has_raw:
                for f in ("activations", "output_gradients"):
                    if x.get(f) is None:
                        raise self._err(name, f, "missing (raw statistics need both activations and output_gradients)")
                # Not scanned here: the server's Gram of them is its finiteness
                # check and names the value and its place (docs/architecture.md);
                # a scan here cost ~10 ms a step for the MNIST autoencoder.
                a = self._array(name, "activations", x["activations"], finite=False)
                g = self._array(name, "output_gradients", x["output_gradients"], finite=False)
                if self.validate:
                    if a.ndim != 2 or a.shape[1] != din:
                        raise self._err(name, "activations", f"shape {list(a.shape)}, expected [rows, {din}] "
                                        "(layer inputs without the bias column)")
                    if g.ndim != 2 or g.shape[1] != dout:
                        raise self._err(name, "output_gradients", f"shape {list(g.shape)}, expected [rows, {dout}]")
                    if a.shape[0] != g.shape[0] or a.shape[0] == 0:
                        raise self._err(name, "output_gradients", f"{g.shape[0]} rows but activations "
                                        f"have {a.shape[0]} (must be equal and > 0)")
                to_tensor(a, dtype, out=bs.kfac.raw.activations, shm=w)
                to_tensor(g, dtype, out=bs.kfac.raw.output_gradients, shm=w)
            elif has_red:
                for f in ("a_factor", "g_factor"):
                    if x.get(f) is None:
                        raise self._err(name, f, "missing (reduced statistics need a_factor, g_factor, num_examples)")
                n = int(x.get("num_examples") or 0)
                if n <= 0:
                    raise self._err(name, "num_examples", "must be a positive integer with reduced statistics")
                # Symmetric: sent as packed upper triangles (step.proto's
                # ReducedKfacStatistics.packed) unless "packed": False; a 1-D
                # factor of d(d+1)/2 values is taken as packed already.
                pack = x.get("packed", True)
                arrs = {}
                for f, d in (("a_factor", din + b), ("g_factor", dout)):
                    arr = self._array(name, f, x[f], [d, d], [d * (d + 1) // 2])
                    if arr.ndim == 1:
                        if arr.shape[0] != d * (d + 1) // 2:
                            raise self._err(name, f, f"packed with {arr.shape[0]} values, expected "
                                            f"d(d+1)/2 = {d * (d + 1) // 2}")
                    elif pack:
                        arr = arr[_triu_indices(d)]
                    arrs[f] = arr
                if len({a.ndim for a in arrs.values()}) != 1:
                    raise self._err(name, "g_factor", "give both factors packed (1-D) or both square")
                to_tensor(arrs["a_factor"], dtype, out=bs.kfac.reduced.a_factor, shm=w)
                to_tensor(arrs["g_factor"], dtype, out=bs.kfac.reduced.g_factor, shm=w)
                bs.kfac.reduced.packed = arrs["a_factor"].ndim == 1
                bs.kfac.reduced.num_examples = n
        else:
            for f in ("activations", "output_gradients", "a_factor", "g_factor", "param1", "grad1",
                      "compositional"):
                if x.get(f) is not None:
                    raise self._err(name, f, f"not accepted by a {kind} block")
        return bs

    def _gaussian_step(self, bs, name, g, x, dtype, w=None):
        copies, dim = max(1, g.copies), g.dim
        s1, s2 = [copies, dim], [copies, dim, dim]
        alt1, alt2 = ([dim], [dim, dim]) if copies == 1 else (None, None)
        comp = x.get("compositional")
        needed = ("param1", "param2") if comp is not None else ("param1", "param2", "grad1", "grad2")
        for f in needed:
            if x.get(f) is None:
                raise self._err(name, f, "missing (Gaussian blocks need param1, param2, grad1, grad2; "
                                "with a compositional input grad1/grad2 may be left out)")
        if comp is not None and (x.get("grad1") is None) != (x.get("grad2") is None):
            raise self._err(name, "grad1" if x.get("grad1") is None else "grad2",
                            "missing (give both rest gradients or neither)")
        # Sent explicitly every time: the server reads an unset gradient_space
        # as expectation gradients, while natgrad.gaussian.step_input defaults
        # to the parametrisation; guessing either for a bare dict is how a
        # silently wrong step happens.
        sp = x.get("gradient_space")
        if sp is None:
            raise self._err(name, "gradient_space", "missing: say 'parametrization' (gradients w.r.t. "
                            "param1/param2, what natgrad.gaussian.step_input sends by default) or "
                            "'expectation' (dL/deta; what the server assumes when the field is unset)")
        if sp not in _GRADIENT_SPACES:
            raise self._err(name, "gradient_space", f"must be 'expectation' or 'parametrization', got {sp!r}")
        layout = x.get("layout")
        if layout not in (None, "natgrad", "gpflow"):
            raise self._err(name, "layout", f"must be 'natgrad' ([L, M] means) or 'gpflow' "
                            f"([M, L] q_mu), got {layout!r}")
        if layout is None and copies == dim and copies > 1:
            # [L, M] and GPflow's [M, L] have the same shape: refuse to guess.
            raise self._err(name, "layout", f"copies == dim == {dim}, so a GPflow-layout q_mu "
                            f"[M, L] cannot be told from natgrad's [L, M]: pass layout='natgrad' "
                            "or layout='gpflow' (natgrad.gaussian.step_input(..., layout=...))")
        gi = bs.gaussian
        for f, s, alt in (("param1", s1, alt1), ("param2", s2, alt2),
                          ("grad1", s1, alt1), ("grad2", s2, alt2)):
            if x.get(f) is None:
                continue  # a compositional step's omitted rest gradient: zero
            v = x[f]
            if layout == "gpflow" and f in ("param1", "grad1"):
                v = self._array(name, f, v, [dim, copies], [dim] if copies == 1 else None)
                v = v.reshape(dim, copies).T
            elif f in ("param1", "grad1") and layout is None and copies != dim:
                a = self._array(name, f, v)
                if list(a.shape) == [dim, copies]:
                    raise self._err(name, f, f"shape {list(a.shape)} is GPflow's q_mu layout [M, L]; "
                                    f"natgrad wants [L, M] = {s1}: pass layout='gpflow' "
                                    "(or natgrad.gaussian.from_gpflow) to have it transposed")
            # Always sent as [copies, dim] / [copies, dim, dim].
            arr = self._array(name, f, v, s, alt)
            if self.validate:
                arr = arr.reshape(s)
            to_tensor(arr, dtype or np.float64, out=getattr(gi, f), shm=w)
        gi.gradient_space = _GRADIENT_SPACES[sp]
        if comp is not None:
            self._gaussian_compositional(gi.compositional, name, copies, dim, comp, dtype, w)
        if layout == "gpflow":
            self._gpflow_blocks.add(name)
        return bs

    def _gaussian_compositional(self, out, name, copies, dim, c, dtype, w=None):
        if not isinstance(c, dict):
            raise self._err(name, "compositional", "must be a dict (natgrad.gaussian.compositional_input)")
        extra = set(c) - {"samples", "likelihood_gradients", "likelihood_fisher", "fisher_form"}
        if extra:
            raise self._err(name, "compositional", f"unknown field(s) {sorted(extra)}")
        form = c.get("fisher_form")
        if form not in _FISHER_FORMS:
            raise self._err(name, "compositional.fisher_form",
                            f"must be one of {sorted(_FISHER_FORMS)}, got {form!r}")
        for f in ("samples", "likelihood_gradients", "likelihood_fisher"):
            if c.get(f) is None:
                raise self._err(name, f"compositional.{f}", "missing")
        one = copies == 1
        eps = self._array(name, "compositional.samples", c["samples"])
        if eps.ndim == 2 and one:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[0] != copies or eps.shape[2] != dim or eps.shape[1] < 1:
            raise self._err(name, "compositional.samples", f"shape {list(np.shape(c['samples']))}, expected "
                            f"[{copies}, S, {dim}]" + (f" or [S, {dim}]" if one else ""))
        ns = eps.shape[1]
        want = {"full": [copies, ns, dim, dim], "diagonal": [copies, ns, dim],
                "shared": [copies, dim, dim]}[form]
        grads = self._array(name, "compositional.likelihood_gradients", c["likelihood_gradients"],
                            [copies, ns, dim], [ns, dim] if one else None)
        fisher = self._array(name, "compositional.likelihood_fisher", c["likelihood_fisher"],
                             want, want[1:] if one else None)
        dt = dtype or np.float64
        to_tensor(eps, dt, out=out.samples, shm=w)
        # (Unvalidated wrong shapes go as they are; the server refuses them.)
        if grads.size == copies * ns * dim:
            grads = grads.reshape([copies, ns, dim])
        if fisher.size == int(np.prod(want)):
            fisher = fisher.reshape(want)
        to_tensor(grads, dt, out=out.likelihood_gradients, shm=w)
        to_tensor(fisher, dt, out=out.likelihood_fisher, shm=w)
        out.fisher_form = _FISHER_FORMS[form]

    def _gaussian_diag_step(self, bs, name, g, x, dtype, w=None):
        """A diagonal Gaussian: four [copies, dim] arrays ([dim] for one copy),
        sent in their own dtype unless `dtype` says otherwise (float32 stays
        float32: these blocks can be millions of elements)."""
        copies, dim = max(1, g.copies), g.dim
        s, alt = [copies, dim], ([dim] if copies == 1 else None)
        if x.get("compositional") is not None:
            raise self._err(name, "compositional", "is taken by full gaussian blocks only "
                            "(blocks.gaussian), not gaussian_diag")
        for f in ("param1", "param2", "grad1", "grad2"):
            if x.get(f) is None:
                raise self._err(name, f, "missing (diagonal Gaussian blocks need param1, param2, grad1, grad2)")
        sp = x.get("gradient_space")
        if sp not in _GRADIENT_SPACES:
            raise self._err(name, "gradient_space", "must be 'parametrization' (gradients w.r.t. "
                            f"param1/param2) or 'expectation' (dL/deta), got {sp!r}")
        gi = bs.gaussian
        for f in ("param1", "param2", "grad1", "grad2"):
            arr = self._array(name, f, x[f], s, alt)
            dt = dtype or (np.float32 if arr.dtype == np.float32 else np.float64)
            to_tensor(arr.reshape(s), dt, out=getattr(gi, f), shm=w)
        gi.gradient_space = _GRADIENT_SPACES[sp]
        return bs

    def build_requests(self, inputs, loss=None, step=None):
        """The StepRequest messages for one step (split at self.split_bytes)."""
        step = self.next_step if step is None else step
        if loss is not None:
            loss = float(loss)
            if self.validate and not np.isfinite(loss):
                raise errors.InvalidArgument(f"step {step}: loss is {loss}", field="loss")
        self._gpflow_blocks = set()
        if not _BUILD_IN_PLACE:
            bss = [self._block_step(n, x, step) for n, x in inputs.items()]
            return self._requests([step_pb2.StepRequest(blocks=g) for g in self._groups(bss)],
                                  step, loss)
        # Each block is built inside the request that carries it; a block
        # that takes the request past split_bytes moves to the next one (one
        # block's copy, once per split).
        groups, cur, cur_bytes = [], step_pb2.StepRequest(), 0
        for n, x in inputs.items():
            bs = self._block_step(n, x, step, out=cur.blocks.add())
            sz = _bytes_of(bs)
            if len(cur.blocks) > 1 and cur_bytes + sz > self.split_bytes:
                moved = step_pb2.StepRequest()
                moved.blocks.add().CopyFrom(bs)
                del cur.blocks[-1]
                groups.append(cur)
                cur, cur_bytes = moved, 0
            cur_bytes += sz
        groups.append(cur)
        return self._requests(groups, step, loss)

    def _groups(self, bss, inline=False):
        """BlockSteps in consecutive groups of at most split_bytes each (one
        block over it alone); ``inline``: sized with their spans' bytes inline."""
        msgs, cur, cur_bytes = [], [], 0
        for bs in bss:
            sz = _bytes_of(bs, inline)
            if cur and cur_bytes + sz > self.split_bytes:
                msgs.append(cur)
                cur, cur_bytes = [], 0
            cur.append(bs)
            cur_bytes += sz
        msgs.append(cur)
        return msgs

    def _requests(self, msgs, step, loss):
        """StepRequests holding the step's blocks -> the step's messages: named,
        numbered, the last marked and carrying the loss, each checked against
        max_message_bytes."""
        reqs = []
        for i, r in enumerate(msgs):
            group = r.blocks
            r.session, r.step, r.last = self.name, step, i == len(msgs) - 1
            if r.last and loss is not None:
                r.loss = loss
            bound = _size_bound(r)
            if (bound is None or bound > self.client.max_message_bytes) and \
                    r.ByteSize() > self.client.max_message_bytes:
                raise errors.ResourceExhausted(
                    f"step {step}: block '{group[0].name}' needs {r.ByteSize()} bytes in one message, "
                    f"over max_message_bytes={self.client.max_message_bytes} (raise it on the "
                    "client and the server's --max_message_bytes, or send reduced statistics)",
                    block=group[0].name)
            reqs.append(r)
        return reqs

    # -- stepping -------------------------------------------------------------
    def step(self, inputs, loss=None):
        """Sends one step and returns its StepResult. Raises a NatgradError
        subclass (the step counter unchanged) when the server rejects it."""
        with self._lock:
            if self._open is not None:
                raise errors.FailedPrecondition(
                    f"session {self.name}: streamed step {self._open.step} is open; finish_step() "
                    "or abort_step() it before step()")
            step = self.next_step
            try:
                reqs = self.build_requests(inputs, loss)
                self._attach_reply(reqs, step)
                resp = self._send_step(reqs, step)
            finally:
                if self._shm is not None:
                    self._shm.finish(step)  # a resend of this number rebuilds its slot
            self._keep(step, reqs, resp)
            self.next_step = step + 1
            result = self._result(resp)
            for n in self._gpflow_blocks:  # back to the caller's [M, L] q_mu layout
                result[n] = result[n].transposed()
            return result

    # -- streamed steps (one step over several messages) ----------------------------
    def begin_step(self):
        """Opens a streamed step and returns its number (next_step): its blocks
        go out as they are ready (send_blocks), each as StepRequest messages
        of the step without ``last``, and finish_step sends the rest with
        ``last = true`` and the loss and returns the StepResult. Between
        them the session sends nothing else (step() is refused).

        The guarantees of step() hold for the whole step: every message is
        kept, so a dropped stream (here or at finish) is reopened and the step
        sent again from its first message, and the acknowledged step goes to
        the replay buffer with all its messages. Any error of send_blocks or
        finish_step abandons the open step (a partial step already on the
        stream is dropped by cancelling the stream) and leaves next_step
        unchanged, so the step can be begun and sent again."""
        with self._lock:
            if self._open is not None:
                raise errors.FailedPrecondition(
                    f"session {self.name}: streamed step {self._open.step} is still open "
                    "(finish_step() or abort_step() it first)")
            self._open = _OpenStep(self.next_step)
            return self.next_step

    def send_blocks(self, inputs):
        """Sends some blocks of the open streamed step (inputs as for step()).
        The messages are queued on the Step stream at once, unless the
        stream must first be reopened after a drop (finish_step then sends
        everything)."""
        with self._lock:
            o = self._require_open("send_blocks")
            try:
                reqs = self.build_requests(inputs, None, step=o.step)
                for r in reqs:
                    r.last = False
                o.gpflow |= self._gpflow_blocks
                o.reqs.extend(reqs)
                s = self._stream
                if s is None and not (self._resync and self._acked > 0):
                    s = self._open_stream()
                    self._resync = False
                if s is not None:
                    if s is not o.stream:  # a stream the step's first messages never went on
                        o.stream, o.sent = s, 0
                    for r in o.reqs[o.sent:]:
                        s.send(r)
                    o.sent = len(o.reqs)
                if self._test_hook is not None:
                    self._test_hook("streamed", self, s, o.step)
            except BaseException:
                self._abandon(o)
                raise

    def finish_step(self, inputs=None, loss=None):
        """Sends the open streamed step's remaining blocks (may be none) with
        ``last = true`` and the loss, waits for the response and returns the
        StepResult; raises a NatgradError subclass (next_step unchanged, the
        step abandoned) when it fails."""
        with self._lock:
            o = self._require_open("finish_step")
            try:
                tail = self.build_requests(inputs or {}, loss, step=o.step)
                o.gpflow |= self._gpflow_blocks
                reqs = o.reqs + tail
                self._attach_reply(reqs, o.step)
                sent = o.sent if (o.stream is not None and o.stream is self._stream) else 0
                resp = self._send_step(reqs, o.step, sent=sent)
            except BaseException:
                self._abandon(o)
                raise
            self._open = None
            if self._shm is not None:
                self._shm.finish(o.step)
            self._keep(o.step, reqs, resp)
            self.next_step = o.step + 1
            result = self._result(resp)
            for n in o.gpflow:
                result[n] = result[n].transposed()
            return result

    def abort_step(self):
        """Abandons the open streamed step, if any (nothing is applied)."""
        with self._lock:
            if self._open is not None:
                self._abandon(self._open)

    @property
    def step_open(self):
        """The number of the open streamed step, or None."""
        o = self._open
        return o.step if o is not None else None

    def _require_open(self, what):
        if self._open is None:
            raise errors.FailedPrecondition(f"session {self.name}: {what}() without an open "
                                            "streamed step (begin_step() first)")
        return self._open

    def _abandon(self, o):
        """Forgets the open step; a part of it on the stream is dropped with the stream."""
        if self._open is o:
            self._open = None
        if self._shm is not None:
            self._shm.finish(o.step)
        if o.stream is not None and o.stream is self._stream and o.sent:
            self._drop_stream()

    # -- shared memory ----------------------------------------------------------
    def _inline_for_replay(self, step, reqs, source=None):
        """A step to send again after a restart, when the regions hold later
        steps: with the bytes inline (read from `source`, the kept step's
        SpanCopies, or else the arena) and no reply buffer, split again at
        split_bytes (its spans made it one small message). Each block's
        bytes go straight into the message that holds it."""
        if not _needs_inlining(reqs):
            return reqs
        source = source if source is not None else self._shm
        what = f"Step {self.name} step {step}"
        loss = reqs[-1].loss if reqs[-1].HasField("loss") else None
        groups = self._groups([bs for r in reqs for bs in r.blocks], inline=True)
        out = []
        for i, group in enumerate(groups):
            r = step_pb2.StepRequest(session=reqs[0].session, step=reqs[0].step,
                                     last=reqs[-1].last and i == len(groups) - 1)
            if r.last and loss is not None:
                r.loss = loss
            for bs in group:
                kept = r.blocks.add()
                kept.CopyFrom(bs)  # spans, not bytes: small
                _shm.inline_spans(kept, source, what)
            out.append(r)
        return out

    def _give_up_shared_memory(self, err, step, reqs):
        """An "auto" session whose server refused its shared memory: `reqs`
        (the refused step, every message of it) and every later step go
        inline (Session docstring). Only the step being sent can hold spans:
        one step is built at a time, and kept steps are inline already."""
        log.info("natgrad: %s: the server does not take this client's shared memory, so steps "
                 "go inline from now on: %s", self.name, err.message)
        reqs[:] = self._inline_for_replay(step, reqs)
        arena, self._shm = self._shm, None
        arena.close()

    def _attach_reply(self, reqs, step):
        """With shared memory: the step's reply buffer, on its last message."""
        if self._shm is not None and reqs:
            if not self._shm.reply_span(step, _reply_estimate(reqs), reqs[-1].reply_buffer):
                reqs[-1].ClearField("reply_buffer")

    def _result(self, resp):
        if self._shm is None:
            return StepResult(resp)
        # A reply that did not all fit came partly inline: size the next
        # reply buffers for all of it.
        self._shm.note_reply_need(_reply_bytes(resp))
        return StepResult(resp, shm=self._shm)

    def _shared_memory_discard(self, step):
        """A step built (in part) and never sent complete (natgrad.torch drops
        it): its slot is rebuilt from the start by the next write."""
        if self._shm is not None:
            self._shm.finish(step)

    def _send_step(self, reqs, step, sent=0):
        """Sends `reqs` (the first `sent` of them already queued on the
        current stream) and returns the response, retrying as the module
        docstring says; every retry sends the whole step again."""
        pol = self.client.retry
        on = self._stream if sent else None
        start = time.monotonic()
        attempt = hops = 0
        open_since = None
        while True:
            attempt += 1
            try:
                if self._stream is None:
                    if self._resync and self._acked > 0:
                        self._reopen(step)
                    else:
                        self._open_stream()
                    self._resync = False
                s = self._stream
                for r in (reqs[sent:] if s is on else reqs):
                    s.send(r)
                if self._test_hook is not None:
                    self._test_hook("sent", self, s, step)
                resp = s.recv()
            except StopIteration:
                self._drop_stream()
                err, reason = errors.Unavailable(f"Step {self.name} step {step}: the server closed "
                                                 "the stream without a response"), "drop"
            except grpc.RpcError as e:
                self._drop_stream()
                moved = session_moved(e)
                if moved is not None and hops < pol.max_redirects:
                    # Moved by a drain: point the session at its new replica
                    # and reopen at once (the reopen replays what it lacks).
                    hops += 1
                    attempt -= 1
                    self.redirects += 1
                    self.client._follow(self.id, moved, f"Step {self.name} step {step}")
                    continue
                reason = _retry_reason(e)
                err = self.client._error(e, f"Step {self.name} step {step}", self.client._route(self.id)[2])
                if reason is None and self._shm is not None and self._shm_auto and \
                        _shared_memory_refusal(err):
                    self._give_up_shared_memory(err, step, reqs)
                    attempt -= 1
                    continue  # sent again at once, inline: the refusal applied nothing
                if reason is None:
                    if self._shm is not None and isinstance(err, errors.FailedPrecondition) and \
                            "shared memory" in err.message:
                        err.message += (" (this session has shared_memory=True: attach with "
                                        "shared_memory=False to send inline)")
                        err.args = (err.message,)
                    raise err from None
            else:
                if resp.step != step:
                    self._drop_stream()
                    raise errors.Internal(f"Step {self.name}: sent step {step}, got a response for step {resp.step}")
                if attempt > 1:
                    log.info("natgrad: %s step %d succeeded after %d attempts (replayed=%s)",
                             self.name, step, attempt, resp.replayed)
                return resp
            # retryable
            now = time.monotonic()
            if reason == "stream_open":
                open_since = open_since or now
                give_up = now - open_since > pol.stream_open_s
            else:
                give_up = pol.exhausted(attempt, start)
            if give_up or now - start > pol.deadline_s:
                err.message += f" (gave up after {attempt} attempts, {now - start:.1f}s)"
                err.args = (err.message,)
                raise err
            self.retries += 1
            log.warning("natgrad: %s step %d: %s; retrying (attempt %d)", self.name, step, err, attempt + 1)
            pol.sleep(attempt, start)
            self.client._await_channel(self.client._route(self.id)[2],
                                       pol.deadline_s - (time.monotonic() - start))
