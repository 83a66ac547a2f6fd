"""Client / Session against a real natgrad-server: lifecycle, steps,
splitting, retries after dropped streams, errors."""
import threading
import time

import grpc
import numpy as np
import pytest

import natgrad
from natgrad import blocks

rng = np.random.default_rng(0)


def sgd_session(client, **kw):
    return client.create_session([blocks.sgd("w", [3, 2], lr=0.5),
                                  blocks.sgd("b", [2], lr=0.5)], **kw)


def grads(seed=0):
    r = np.random.default_rng(seed)
    return {"w": r.standard_normal((3, 2)).astype(np.float32),
            "b": r.standard_normal(2).astype(np.float32)}


def kfac_inputs(seed, n=8, d_in=4, d_out=3):
    r = np.random.default_rng(seed)
    return {"gradient": r.standard_normal((d_out, d_in + 1)),
            "activations": r.standard_normal((n, d_in)),
            "output_gradients": r.standard_normal((n, d_out))}


def wait_for(pred, timeout=10.0):
    """Polls pred() (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


def test_session_lifecycle(client):
    s = sgd_session(client, display_name="lifecycle")
    assert s.name.startswith("sessions/") and s.next_step == 1
    info = client.get_session_info(s.name)
    assert info.last_step == 0 and info.config.display_name == "lifecycle"
    assert s.name in [x.name for x in client.list_sessions()]
    r = s.step(grads(), loss=1.0)
    assert r.step == 1 and not r.replayed
    np.testing.assert_allclose(r["w"], -0.5 * grads()["w"], rtol=1e-6)
    np.testing.assert_allclose(r["b"], -0.5 * grads()["b"], rtol=1e-6)
    assert r["w"].dtype == np.float32
    s.step(grads(1))
    assert s.next_step == 3 and s.info().last_step == 2
    # Attaching from another Session object continues the numbering.
    s.close()
    s2 = client.get_session(s.id)
    assert s2.next_step == 3
    s2.step(grads(2))
    s2.delete()
    assert s.name not in [x.name for x in client.list_sessions()]
    with pytest.raises(natgrad.NotFound) as e:
        client.get_session_info(s.name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_client_chosen_id_and_duplicate(client):
    s = sgd_session(client, session_id="py-fixed-id-01")
    assert s.name == "sessions/py-fixed-id-01"
    with pytest.raises(natgrad.NatgradError) as e:
        sgd_session(client, session_id="py-fixed-id-01")
    assert e.value.code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)
    s.delete()


def test_float64_in_float64_out(client):
    g = np.array([1.0, 2.0, 3.0, 1e-12])
    s = client.create_session([blocks.sgd("w", [4], lr=1.0)], state_dtype="float64")
    r = s.step({"w": g})
    assert r["w"].dtype == np.float64
    np.testing.assert_allclose(r["w"], -g, rtol=1e-15)
    s.delete()
    s = client.create_session([blocks.sgd("w", [4], lr=1.0)])  # float32 state
    r = s.step({"w": g})
    assert r["w"].dtype == np.float64
    np.testing.assert_allclose(r["w"], -g, rtol=1e-7)
    s.delete()


def test_split_step_equals_single_message(client):
    cfg = [blocks.adam("l1", [3, 5], lr=0.1), blocks.sgd("l2", [3, 5], lr=0.1, momentum=0.9),
           blocks.adam("p", [5], lr=1e-2)]
    a = client.create_session(cfg)
    b = client.create_session(cfg)
    b.split_bytes = 1  # one block per message
    for t in range(1, 4):
        inputs = {"l1": kfac_inputs(t)["gradient"], "l2": kfac_inputs(t + 10)["gradient"],
                  "p": np.arange(5.0) * t}
        assert len(b.build_requests(inputs)) == 3
        ra, rb = a.step(inputs), b.step(inputs)
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
    a.delete()
    b.delete()


def test_request_size_bound_is_tight_without_reading_tensor_bytes(client, monkeypatch):
    """build_requests sizes messages from each tensor's dtype and shape
    (client._size_bound): never below the real size, within a few dozen
    bytes per tensor of it, and without touching any tensor's data (a read
    would copy it from the message)."""
    from natgrad._pb import step_pb2, tensor_pb2
    from natgrad.client import _size_bound
    from natgrad.tensor import to_tensor
    cfg = [blocks.kfac_dense("fc", d_in=4, d_out=3, lr=0.1),
           blocks.adam("scalar", [1], lr=0.1), blocks.adam("w64", [6, 7], lr=0.1)]
    s = client.create_session(cfg)
    inputs = {"fc": kfac_inputs(0, n=2000), "scalar": np.float32([2.0]),
              "w64": rng.standard_normal((6, 7))}
    reqs = s.build_requests(inputs, loss=1.0)
    # And tensors no step of these blocks has: empty, 0-d, in a span.
    extra = step_pb2.BlockStep(name="extra")
    to_tensor(np.zeros((0, 3), np.float32), out=extra.gradient)
    to_tensor(np.float64(1.5), out=extra.params)
    span = extra.kfac.raw.activations
    span.dtype, span.shape[:] = tensor_pb2.FLOAT32, [5, 2]
    span.shared_memory.region, span.shared_memory.length = "natgrad-x" * 20, 40
    reqs.append(step_pb2.StepRequest(session=s.name, blocks=[extra]))
    tensors = sum(1 for r in reqs for b in r.blocks for _ in natgrad.shared_memory.tensors(b))
    assert tensors >= 8
    exact = sum(r.ByteSize() for r in reqs)
    with monkeypatch.context() as m:
        def no_read(self):
            raise AssertionError("_size_bound read a tensor's data")
        m.setattr(tensor_pb2.Tensor, "data", property(no_read), raising=False)
        bound = sum(_size_bound(r) for r in reqs)
    assert exact > 100_000 and exact <= bound <= exact + 200 * tensors
    for r in reqs:
        for b in r.blocks:
            assert b.ByteSize() <= _size_bound(b)
    assert s.step(inputs, loss=1.0).step == 1
    s.delete()


@pytest.mark.parametrize("in_place", [True, False])
def test_requests_built_in_place_equal_those_assembled_from_blocks(client, monkeypatch, in_place):
    """build_requests builds blocks inside their requests (cpp protobuf) or
    alone and then copies them in (upb): the same messages either way, split
    at the same places, and the step the same."""
    import natgrad.client as nc
    cfg = [blocks.kfac_dense(f"l{i}", d_in=4, d_out=3, lr=0.1) for i in range(5)]
    ref, s = client.create_session(cfg), client.create_session(cfg)
    ref.split_bytes = s.split_bytes = 3000  # two blocks of about 1.3 kB per message
    x = {f"l{i}": kfac_inputs(i, n=20) for i in range(5)}
    monkeypatch.setattr(nc, "_BUILD_IN_PLACE", not in_place)
    want = [r.SerializeToString(deterministic=True) for r in ref.build_requests(x, loss=2.0)]
    monkeypatch.setattr(nc, "_BUILD_IN_PLACE", in_place)
    got = s.build_requests(x, loss=2.0)
    assert 1 < len(got) < 5
    assert [r.SerializeToString(deterministic=True).replace(s.name.encode(), ref.name.encode())
            for r in got] == want
    ra, rb = ref.step(x, loss=2.0), s.step(x, loss=2.0)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])
    ref.delete()
    s.delete()


def test_block_step_messages_as_inputs_are_sent_unchanged(client):
    """A BlockStep given as a step's input (what natgrad.torch builds) is
    used as it is, named or not, and left as it was: the step equals the
    same inputs given as arrays."""
    from natgrad._pb import step_pb2
    cfg = [blocks.kfac_dense("fc", d_in=4, d_out=3, lr=0.1), blocks.adam("p", [5], lr=1e-2)]
    a, b = client.create_session(cfg), client.create_session(cfg)
    for t in range(1, 4):
        x = {"fc": kfac_inputs(t), "p": np.arange(5.0) * t}
        named = b._block_step("fc", x["fc"])
        unnamed = b._block_step("p", x["p"])
        unnamed.ClearField("name")
        before = [m.SerializeToString(deterministic=True) for m in (named, unnamed)]
        ra, rb = a.step(x), b.step({"fc": named, "p": unnamed})
        assert [m.SerializeToString(deterministic=True) for m in (named, unnamed)] == before
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k])
    with pytest.raises(natgrad.InvalidArgument, match="names block 'fc'"):
        b.step({"p": step_pb2.BlockStep(name="fc")})
    a.delete()
    b.delete()


def test_retry_after_stream_cancelled_before_response(client):
    """The stream dies after the server applied the step but before the client
    read the response: the client reconnects, resends the same step number and
    gets the cached response (replayed); the session advanced exactly once."""
    cfg = [blocks.adam("l", [5, 3], lr=0.1)]  # stateful: a re-applied step would differ
    ref = client.create_session(cfg)
    s = client.create_session(cfg)
    fired = []

    def hook(event, sess, stream, step):
        if event == "sent" and step == 2 and not fired:
            fired.append(step)
            wait_for(lambda: client.get_session_info(sess.name).last_step == 2)
            stream.cancel()

    s._test_hook = hook
    for t in range(1, 5):
        inputs = {"l": kfac_inputs(t)["gradient"].T}
        r, rr = s.step(inputs), ref.step(inputs)
        np.testing.assert_array_equal(r["l"], rr["l"])
        if t == 2:
            assert r.replayed, "the retried step should be answered from the server's cache"
    assert fired == [2] and s.retries >= 1
    assert s.info().last_step == 4
    s.delete()
    ref.delete()


def test_retry_after_stream_cancelled_mid_step(client):
    """The stream dies after part of a split step was sent: the server never
    applied it; the client resends the whole step on a new stream."""
    cfg = [blocks.sgd("a", [2], lr=1.0), blocks.sgd("b", [2], lr=1.0)]
    s = client.create_session(cfg)
    s.split_bytes = 1
    orig = natgrad.client._Stream.send
    state = {"n": 0}

    def send(self, msg):
        state["n"] += 1
        orig(self, msg)
        if state["n"] == 1:  # first half of step 1 is out: drop the stream
            self.cancel()

    natgrad.client._Stream.send = send
    try:
        r = s.step({"a": np.ones(2), "b": 2 * np.ones(2)})
    finally:
        natgrad.client._Stream.send = orig
    np.testing.assert_allclose(r["a"], -np.ones(2))
    np.testing.assert_allclose(r["b"], -2 * np.ones(2))
    assert s.retries >= 1 and s.info().last_step == 1
    s.delete()


def test_stream_already_open_is_retried_then_reported(client):
    s = sgd_session(client)
    s.step(grads())
    other = client.get_session(s.name)
    other.client = natgrad.Client(client.target, retry=natgrad.RetryPolicy(stream_open_s=0.3))
    with pytest.raises(natgrad.FailedPrecondition, match="already open"):
        other.step(grads())
    # Once the first stream closes, the second one may step.
    s.close()
    other.client.retry = natgrad.RetryPolicy(stream_open_s=10)
    assert other.step(grads()).step == 2
    other.delete()


def test_step_order_errors(client):
    s = sgd_session(client)
    s.step(grads())
    s.close()
    s.next_step = 5  # a gap
    with pytest.raises(natgrad.FailedPrecondition):
        s.step(grads())
    s.next_step = 2
    assert s.step(grads()).step == 2
    s.delete()


def test_client_side_validation_names_block_and_field(client):
    s = client.create_session([blocks.kfac_dense("fc1", 4, 3), blocks.adam("bn", [3], lr=1e-3)])
    good = kfac_inputs(0)
    cases = [
        ({"fc1": {**good, "gradient": np.zeros((3, 4))}}, "fc1", "gradient"),
        ({"fc1": {**good, "activations": np.zeros((8, 5))}}, "fc1", "activations"),
        ({"fc1": {**good, "output_gradients": np.zeros((7, 3))}}, "fc1", "output_gradients"),
        ({"fc1": {**good, "gradient": np.full((3, 5), np.nan)}}, "fc1", "gradient"),
        ({"nope": np.zeros(3)}, "nope", None),
        ({"bn": np.zeros((3, 1))}, "bn", "gradient"),
        ({"bn": {"gradient": np.zeros(3), "activations": np.zeros((2, 2))}}, "bn", "activations"),
    ]
    for inputs, block, field in cases:
        with pytest.raises(natgrad.InvalidArgument) as e:
            s.step(inputs)
        assert f"'{block}'" in str(e.value) and e.value.block == block
        if field:
            assert field in str(e.value) and e.value.field == field
    assert s.next_step == 1 and s.info().last_step == 0
    s.delete()


def test_server_side_validation_leaves_session_unchanged(client):
    s = client.create_session([blocks.kfac_dense("fc1", 4, 3, lr=0.1, damping=1e-2)])
    s.validate = False
    bad = {**kfac_inputs(0), "activations": np.zeros((8, 5))}
    with pytest.raises(natgrad.InvalidArgument) as e:
        s.step({"fc1": bad})
    assert "fc1" in e.value.message
    with pytest.raises(natgrad.InvalidArgument):
        s.step({"fc1": {**kfac_inputs(0), "gradient": np.full((3, 5), np.nan)}})
    assert s.info().last_step == 0 and s.next_step == 1
    s.validate = True
    assert s.step({"fc1": kfac_inputs(0)}).step == 1
    s.delete()


def test_session_deleted_underneath(client):
    s = sgd_session(client)
    s.step(grads())
    s.close()
    client.delete_session(s.name)
    with pytest.raises(natgrad.NotFound):
        s.step(grads())


def test_server_unreachable():
    c = natgrad.Client("127.0.0.1:1", timeout=2.0,
                       retry=natgrad.RetryPolicy(max_attempts=2, deadline_s=2.0))
    t0 = time.monotonic()
    with pytest.raises(natgrad.Unavailable) as e:
        c.create_session([blocks.sgd("w", [1], lr=0.1)])
    assert "127.0.0.1:1" in str(e.value)
    assert time.monotonic() - t0 < 15
    with pytest.raises(natgrad.Unavailable):
        c.wait_ready(timeout=0.2)


def test_invalid_config_rejected_by_server(client):
    bad = blocks.sgd("w", [3], lr=0.1)
    bad.shape[:] = [0]
    with pytest.raises(natgrad.InvalidArgument):
        client.create_session([bad])


def test_concurrent_sessions(client):
    errs = []

    def work(i):
        try:
            s = client.create_session([blocks.kfac_dense("l", 4, 3, lr=0.1, damping=1e-2)])
            for t in range(5):
                s.step({"l": kfac_inputs(i * 10 + t)})
            s.delete()
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    th = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not errs, errs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("field,value,at", [("activations", np.nan, (3, 2)),
                                            ("output_gradients", -np.inf, (7, 1)),
                                            ("activations", np.inf, (0, 0))])
def test_non_finite_raw_statistics_are_refused_by_the_server_with_their_place(
        client, dtype, field, value, at):
    """The client does not scan raw statistics (the server's Gram is the
    check): a NaN or Inf is refused with its block, field, value and place,
    nothing is applied, and the next finite step is step 1."""
    s = client.create_session([blocks.kfac_dense("fc", 5, 3, bias=True, lr=0.1, damping=1e-2)])
    r = np.random.default_rng(1)
    x = {"gradient": r.standard_normal((3, 6)).astype(dtype),
         "activations": r.standard_normal((9, 5)).astype(dtype),
         "output_gradients": r.standard_normal((9, 3)).astype(dtype)}
    bad = dict(x)
    bad[field] = x[field].copy()
    bad[field][at] = value
    with pytest.raises(natgrad.InvalidArgument) as e:
        s.step({"fc": bad})
    want = f'block "fc": kfac.raw.{field} has a non-finite value ({value}) at [{at[0]}, {at[1]}]'
    assert want in str(e.value)
    assert s.next_step == 1 and s.info().last_step == 0
    assert s.step({"fc": x}).step == 1
    s.delete()
