"""The client side of the shared-memory transport without a server
(natgrad.shared_memory; docs/shared_memory.md): what a Session with
shared_memory=True writes and where, checked against the same session's
inline encoding, and reading replies back. The steps through a real
natgrad-server are in test_shared_memory_server.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

import natgrad
from natgrad import blocks, errors
from natgrad import shared_memory as shm
from natgrad._pb import session_pb2, step_pb2, tensor_pb2

CFG = blocks.session_config([
    blocks.adam("w", [4, 3], lr=0.05),
    blocks.sgd("b", [3], lr=0.1),
    blocks.kfac_dense("fc", 5, 3, bias=True),
    blocks.kfac_dense("red", 6, 2, bias=False),
    blocks.gaussian("q", dim=3, copies=2),
])


def session(shared_memory):
    # Never connects: these tests only build requests and read replies.
    info = session_pb2.Session(name="sessions/probe", config=CFG)
    return natgrad.Session(natgrad.Client("127.0.0.1:1"), info, shared_memory=shared_memory)


def inputs(t, dtype=np.float64, big=1):
    r = np.random.default_rng(t)
    f = lambda *s: r.standard_normal(s).astype(dtype)  # noqa: E731
    a6 = f(9, 6)
    L = np.tril(f(2, 3, 3)) + 3 * np.eye(3)
    return {
        "w": {"gradient": f(4, 3), "params": f(4, 3)},
        "b": f(3),
        # float32 gradient, float64 rows: the rows go as float32 (the
        # gradient's dtype), converted in the copy.
        "fc": {"gradient": f(3, 6).astype(np.float32), "activations": f(7 * big, 5),
               "output_gradients": np.asfortranarray(f(7 * big, 3))},  # (not C-contiguous)
        "red": {"gradient": f(2, 6), "a_factor": a6.T @ a6, "g_factor": np.eye(2) * 2.0,
                "num_examples": 9},
        "q": {"param1": f(2, 3), "param2": L @ L.transpose(0, 2, 1), "grad1": f(2, 3),
              "grad2": f(2, 3, 3), "gradient_space": "parametrization", "layout": "natgrad"},
    }


def spans(msg):
    return [t.shared_memory for t in shm.tensors(msg) if t.HasField("shared_memory")]


def on_disk(name):
    return os.path.exists(os.path.join("/dev/shm", name))


@pytest.fixture()
def s():
    sess = session(True)
    yield sess
    sess.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_tensor_goes_as_a_span_holding_the_inline_bytes(s, dtype):
    inline = session(False).build_requests(inputs(1, dtype), loss=0.5)
    reqs = s.build_requests(inputs(1, dtype), loss=0.5)
    assert len(reqs) == len(inline) == 1
    got = list(shm.tensors(reqs[0]))
    want = list(shm.tensors(inline[0]))
    assert len(got) == len(want) == 13
    for g, w in zip(got, want):
        assert g.HasField("shared_memory") and not g.data and not w.HasField("shared_memory")
        assert (g.dtype, list(g.shape)) == (w.dtype, list(w.shape))
        assert g.shared_memory.length == len(w.data)
        assert s._shm.read_bytes(g.shared_memory) == w.data
    # Materialised, the request is the inline one, byte for byte.
    assert shm.materialize(reqs[0], s._shm).SerializeToString() == inline[0].SerializeToString()
    # A span costs the message a few dozen bytes instead of the values.
    assert reqs[0].ByteSize() < inline[0].ByteSize() - sum(len(w.data) for w in want) + 40 * len(want)


def test_spans_are_aligned_disjoint_and_in_a_valid_region(s):
    reqs = s.build_requests(inputs(1))
    sp = sorted(spans(reqs[0]), key=lambda x: x.offset)
    assert len({x.region for x in sp}) == 1
    region = sp[0].region
    assert shm.valid_region_name(region) and on_disk(region)
    size = os.path.getsize(os.path.join("/dev/shm", region))
    for a, b in zip(sp, sp[1:]):
        assert a.offset % shm.ALIGN == 0 and a.offset + a.length <= b.offset
    assert sp[-1].offset + sp[-1].length <= size


def test_the_reply_buffer_is_on_the_last_message_and_sized_for_the_updates(s):
    s.split_bytes = 1  # one block per message (the spans are tiny, so force it)
    reqs = s.build_requests(inputs(1))
    s._attach_reply(reqs, 1)
    assert len(reqs) == 5
    assert [r.HasField("reply_buffer") for r in reqs] == [False] * 4 + [True]
    rb = reqs[-1].reply_buffer
    assert rb.region not in {x.region for r in reqs for x in spans(r)}
    assert rb.offset == 0 and rb.length >= 64 * 6 and on_disk(rb.region)


def test_steps_alternate_two_slots_and_reuse_them_two_steps_later(s):
    r1 = s.build_requests(inputs(1), step=1)
    r2 = s.build_requests(inputs(2), step=2)
    reg1 = {x.region for x in spans(r1[0])}
    reg2 = {x.region for x in spans(r2[0])}
    assert reg1.isdisjoint(reg2)
    # Step 1 in flight while step 2 was built: its bytes are intact.
    inline1 = session(False).build_requests(inputs(1), step=1)
    assert shm.materialize(r1[0], s._shm).SerializeToString() == inline1[0].SerializeToString()
    s._shm.finish(1)
    r3 = s.build_requests(inputs(3), step=3)
    assert {x.region for x in spans(r3[0])} == reg1
    assert [x.offset for x in spans(r3[0])] == [x.offset for x in spans(r1[0])]


def test_a_rebuilt_step_starts_its_slot_afresh(s):
    first = [x.offset for x in spans(s.build_requests(inputs(1))[0])]
    # Built again before anything was sent (no finish): appended after.
    again = [x.offset for x in spans(s.build_requests(inputs(1))[0])]
    assert min(again) > max(first)
    s._shm.finish(1)  # the step was sent or failed: a new build of 1 is a rebuild
    assert [x.offset for x in spans(s.build_requests(inputs(1))[0])] == first


def test_a_step_that_outgrows_its_region_regrows_and_keeps_what_it_wrote(s):
    small = s.build_requests(inputs(1), step=1)
    (old,) = {x.region for x in spans(small[0])}
    s._shm.finish(1)
    # Step 3 (the same slot) needs ~ 3 MB: the first region (1 MiB) overflows.
    big = s.build_requests(inputs(3, big=40000), step=3)
    regions = [x.region for x in spans(big[0])]
    assert regions[0] == old and len(set(regions)) == 2
    inline = session(False).build_requests(inputs(3, big=40000), step=3)
    assert shm.materialize(big[0], s._shm).SerializeToString() == inline[0].SerializeToString()
    s._shm.finish(3)
    # The next step of the slot fits in the new region; the old one is gone.
    again = s.build_requests(inputs(5, big=40000), step=5)
    assert {x.region for x in spans(again[0])} == {regions[-1]}
    assert not on_disk(old) and old not in s.shared_memory_regions
    # The other slot is sized for the largest step at its next reset: one region.
    s.build_requests(inputs(2), step=2)
    s._shm.finish(2)
    other = s.build_requests(inputs(4, big=40000), step=4)
    (reg4,) = {x.region for x in spans(other[0])}
    assert os.path.getsize(os.path.join("/dev/shm", reg4)) >= s._shm._slots[1].used


def test_replies_are_read_as_copies_and_only_from_the_sessions_regions(s):
    reqs = s.build_requests(inputs(1))
    s._attach_reply(reqs, 1)
    rb = reqs[-1].reply_buffer
    region = s._shm._regions[rb.region]
    want = np.arange(18, dtype=np.float32).reshape(3, 6)
    resp = step_pb2.StepResponse(step=1)
    u = resp.updates.add(name="fc")
    u.delta.dtype, u.delta.shape[:] = tensor_pb2.FLOAT32, [3, 6]
    off = rb.offset  # what the server does: aligned spans in the reply buffer
    region.view(np.dtype("<f4"), (3, 6), off)[...] = want
    u.delta.shared_memory.region, u.delta.shared_memory.offset = rb.region, off
    u.delta.shared_memory.length = want.nbytes
    v = resp.updates.add(name="b")  # one that did not fit: inline
    natgrad.tensor.to_tensor(np.ones(3), out=v.delta)
    r = s._result(resp)
    assert np.array_equal(r["fc"], want) and np.array_equal(r["b"], np.ones(3))
    region.view(np.dtype("<f4"), (3, 6), off)[...] = -1  # the slot reused later
    assert np.array_equal(r["fc"], want)  # a copy, not a view
    # The kept answer holds the values: it equals the inline response, and
    # outlives the reply buffer's reuse.
    inline = step_pb2.StepResponse()
    inline.CopyFrom(resp)
    natgrad.tensor.to_tensor(want, out=inline.updates[0].delta)
    region.view(np.dtype("<f4"), (3, 6), off)[...] = want
    resp.durable_step = 0  # not durable: kept
    s._keep(1, reqs, resp)
    region.view(np.dtype("<f4"), (3, 6), off)[...] = -1
    kept = s._kept[1].answer(s)
    assert not natgrad.shared_memory.has_spans(kept)
    inline.durable_step = 0
    assert natgrad.client._same_answer(inline, kept)
    replayed = step_pb2.StepResponse()
    replayed.CopyFrom(inline)
    replayed.replayed, replayed.durable_step, replayed.timing.server_micros = True, 7, 99
    assert natgrad.client._same_answer(replayed, kept)  # those three may differ
    other = step_pb2.StepResponse()
    other.CopyFrom(inline)
    other.updates[0].delta.data = (want + 1).tobytes()
    assert not natgrad.client._same_answer(other, kept)
    assert not natgrad.client._same_answer(step_pb2.StepResponse(step=1), kept)
    region.view(np.dtype("<f4"), (3, 6), off)[...] = want
    # A span in a region that is not the session's, or past its end.
    bad = step_pb2.StepResponse()
    bad.CopyFrom(resp)
    bad.updates[0].delta.shared_memory.region = "natgrad-someone-else"
    with pytest.raises(errors.Internal, match="natgrad-someone-else"):
        s._result(bad)
    bad.updates[0].delta.shared_memory.region = rb.region
    bad.updates[0].delta.shared_memory.offset = rb.length - 8
    with pytest.raises(errors.Internal, match="outside region"):
        s._result(bad)


def test_the_replay_buffer_keeps_steps_inline_without_a_reply_buffer(s):
    inline = session(False).build_requests(inputs(1), loss=1.0)
    reqs = s.build_requests(inputs(1), loss=1.0)
    s._attach_reply(reqs, 1)
    s._keep(1, reqs, step_pb2.StepResponse(step=1, durable_step=0))  # not durable: kept
    kept, n = s._kept[1].requests(s), s._kept[1].nbytes
    assert [k.SerializeToString() for k in kept] == [r.SerializeToString() for r in inline]
    # Counted from the sizes, not the bytes: at least what they are, within a
    # few bytes a field (requests and the answer).
    exact = sum(r.ByteSize() for r in inline) + step_pb2.StepResponse(step=1).ByteSize()
    assert exact <= n <= exact + 1024 and s.replay_bytes == n
    # The live request still carries its spans (a retry resends them).
    assert spans(reqs[0]) and reqs[-1].HasField("reply_buffer")


def test_kept_steps_are_split_again_at_split_bytes_inline(s):
    inline = session(False)
    s.split_bytes = inline.split_bytes = 10000
    want = inline.build_requests(inputs(1, big=100), loss=1.0)  # fc's rows: 22 kB inline
    reqs = s.build_requests(inputs(1, big=100), loss=1.0)
    assert len(reqs) == 1 < len(want)
    s._attach_reply(reqs, 1)
    s._keep(1, reqs, step_pb2.StepResponse(step=1, durable_step=0))
    kept = s._kept[1].requests(s)
    assert [k.SerializeToString() for k in kept] == [w.SerializeToString() for w in want]


def test_a_kept_step_holds_one_copy_of_its_spans_in_recycled_buffers(s):
    """Keeping a step copies each span once, into a buffer the pool gives
    back when the step is durable; the next kept step reuses it (no fresh
    allocation), and what a replay sends is unaffected by the regions' reuse."""
    inline = session(False)
    want = [r.SerializeToString() for r in inline.build_requests(inputs(1), loss=1.0, step=1)]
    reqs = s.build_requests(inputs(1), loss=1.0, step=1)
    s._attach_reply(reqs, 1)
    s._shm.finish(1)
    s._keep(1, reqs, step_pb2.StepResponse(step=1, durable_step=0))
    n = sum(x.length for x in spans(reqs[0]))
    pool = s._copy_pool
    assert pool._out == n and pool.free_bytes == 0
    held = [b for b in s._kept[1]._copies._copies.values()]
    # Step 3 reuses step 1's region; step 1's kept bytes are copies.
    for t in (2, 3):
        r = s.build_requests(inputs(t), loss=1.0, step=t)
        s._attach_reply(r, t)
        s._shm.finish(t)
    assert {x.region for x in spans(r[0])} == {x.region for x in spans(reqs[0])}
    assert [k.SerializeToString() for k in s._kept[1].requests(s)] == want
    # Step 1 durable, step 3 kept: step 3's copies are step 1's buffers.
    s._keep(3, r, step_pb2.StepResponse(step=3, durable_step=2))
    assert list(s._kept) == [3] and pool._out == n and pool.free_bytes == 0
    reused = list(s._kept[3]._copies._copies.values())
    assert sorted(map(id, reused)) == sorted(map(id, held))
    want3 = [x.SerializeToString() for x in inline.build_requests(inputs(3), loss=1.0, step=3)]
    assert [k.SerializeToString() for k in s._kept[3].requests(s)] == want3
    # All durable: the pool keeps the buffers for the next kept step, within
    # the most it held, and a reset drops them.
    s._keep(4, r, step_pb2.StepResponse(step=4, durable_step=4))
    assert not s._kept and pool._out == 0 and pool.free_bytes == n
    pool.clear()
    assert pool.free_bytes == 0


def test_the_copy_pool_holds_no_more_than_its_high_water_mark():
    pool = natgrad.shared_memory.CopyPool()
    a, b = pool.take(100), pool.take(100)
    assert len(a) == len(b) == 100 and pool._peak == 200
    pool.give(a)
    pool.give(b)
    assert pool.free_bytes == 200
    c = pool.take(100)
    assert c is b or c is a  # recycled, not fresh
    d = pool.take(50)  # another size: fresh (free 100, out 150)
    pool.give(d)  # free 100 + out 100 + 50 > peak 200: dropped
    assert pool.free_bytes == 100 and pool._out == 100
    pool.give(c)  # free 100 + out 0 + 100 <= 200: kept
    assert pool.free_bytes == 200 and pool._out == 0
    e = pool.take(100)
    pool.clear()  # the high-water mark restarts at what is out
    assert pool.free_bytes == 0 and pool._peak == 100
    pool.give(e)
    assert pool.free_bytes == 100 and pool._out == 0
    pool.clear()
    f = pool.take(100)
    pool.give(f)
    assert pool.free_bytes == 100  # the new high-water mark


def test_close_unlinks_everything_and_a_later_step_makes_new_regions(s):
    reqs = s.build_requests(inputs(1))
    s._attach_reply(reqs, 1)
    names = s.shared_memory_regions
    assert len(names) == 2 and all(on_disk(n) for n in names)
    s.close()
    assert s.shared_memory_regions == [] and not any(on_disk(n) for n in names)
    s.build_requests(inputs(2), step=2)
    assert len(s.shared_memory_regions) == 1


def test_regions_are_unlinked_at_exit_without_close():
    code = ("import natgrad, numpy as np, sys; sys.path.insert(0, %r); import test_shared_memory as t;"
            "s = t.session(True); r = s.build_requests(t.inputs(1)); s._attach_reply(r, 1);"
            "print(' '.join(s.shared_memory_regions))") % os.path.dirname(__file__)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = p.stdout.split()
    assert len(names) == 2 and not any(on_disk(n) for n in names)
    assert "leaked" not in p.stderr  # (multiprocessing's resource tracker had nothing to clean)


def test_option_values():
    assert not session(False).shared_memory and session(None).shared_memory is False
    assert session(True).shared_memory
    s = session(4 << 20)
    s.build_requests(inputs(1))
    (name,) = s.shared_memory_regions
    assert os.path.getsize(os.path.join("/dev/shm", name)) == 4 << 20
    s.close()
    for bad in (-1, 0.5, "yes"):
        with pytest.raises(ValueError, match="shared_memory"):
            session(bad)
    # The client's default applies to its sessions.
    c = natgrad.Client("127.0.0.1:1", shared_memory=True)
    assert natgrad.Session(c, session_pb2.Session(name="sessions/x", config=CFG)).shared_memory
    assert not natgrad.Session(c, session_pb2.Session(name="sessions/x", config=CFG),
                               shared_memory=False).shared_memory


def test_empty_tensors_stay_inline():
    a = shm.Arena()
    w = natgrad.client._SpanWriter(a, 1)
    t = natgrad.tensor.to_tensor(np.zeros((0, 3)), shm=w)
    assert not t.HasField("shared_memory") and t.data == b"" and list(t.shape) == [0, 3]
    t = natgrad.tensor.to_tensor(np.float64(2.5), shm=w)  # a scalar: shape []
    assert t.HasField("shared_memory") and list(t.shape) == [] and t.shared_memory.length == 8
    assert natgrad.tensor.from_tensor(t, shm=a) == 2.5
    a.close()
