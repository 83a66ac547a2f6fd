"""shared_memory="auto" (natgrad.Session): shared memory while the server
takes it, inline from the first refusal on. Against real servers: one
without --shared_memory (conftest's), one with it, and one that cannot open
the client's regions (another host, as the server sees it). The refused step
is sent again inline at once and every result equals an inline session's bit
for bit; nothing is applied twice."""
import os

import numpy as np
import pytest

import natgrad
from natgrad import blocks
from natgrad import shared_memory as shm

from conftest import crashable_server, patient_client
from test_shared_memory_server import check_reply_in_buffer, config, inputs, same
from test_shared_memory_server import shm_server  # noqa: F401  (a fixture)


def test_the_value_is_checked():
    for bad in ("yes", "Auto", 0, -5, 1.5):
        with pytest.raises(ValueError, match="auto"):
            natgrad.Client("127.0.0.1:1", shared_memory=bad)


def test_auto_against_a_server_without_shared_memory_goes_inline(target, caplog):
    c = natgrad.Client(target)  # conftest's server: no --shared_memory
    ref = c.create_session(**config(np.float64))
    s = c.create_session(**config(np.float64), shared_memory="auto")
    assert s.shared_memory
    names = s.shared_memory_regions
    with caplog.at_level("INFO", logger="natgrad"):
        for t in range(1, 5):
            same(ref.step(inputs(t, np.float64), loss=1.0 / t),
                 s.step(inputs(t, np.float64), loss=1.0 / t))
            assert not s.shared_memory and s.shared_memory_regions == []
    assert sum("steps go inline from now on" in r.getMessage() for r in caplog.records) == 1
    assert "--shared_memory" in caplog.text
    # Applied once each: the refused first try changed nothing.
    assert s.info().last_step == 4 and s.next_step == 5 and s.retries == 0
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    for kept in s._kept.values():
        assert not any(x.HasField("reply_buffer") or shm.has_spans(x) for x in kept.requests(s))
    ref.delete()
    s.delete()


def test_auto_streamed_step_against_a_server_without_shared_memory(target):
    c = natgrad.Client(target, shared_memory="auto")  # the client's default
    ref = c.create_session(**config(np.float32), shared_memory=False)
    s = c.create_session(**config(np.float32))
    assert s.shared_memory and not ref.shared_memory
    for t in range(1, 4):
        x = inputs(t, np.float32)
        want = ref.step(x, loss=0.5)
        assert s.begin_step() == t
        s.send_blocks({k: x[k] for k in ("raw", "red")})  # sent with spans on step 1
        s.send_blocks({"q": x["q"]})
        same(want, s.finish_step({k: x[k] for k in ("b", "w", "d")}, loss=0.5))
        assert not s.shared_memory
    assert s.info().last_step == 3
    ref.delete()
    s.delete()


def test_auto_against_a_server_with_shared_memory_keeps_it(shm_server):
    c = natgrad.Client(shm_server.target)
    ref = c.create_session(**config(np.float32))
    s = c.create_session(**config(np.float32), shared_memory="auto")
    for t in range(1, 4):
        r = s.step(inputs(t, np.float32), loss=1.0)
        same(ref.step(inputs(t, np.float32), loss=1.0), r)
        assert s.shared_memory
        check_reply_in_buffer(r, s)
    ref.delete()
    s.delete()


def test_auto_when_the_server_cannot_open_the_regions_goes_inline(shm_server, monkeypatch):
    """A server on another host (or in another container's /dev/shm) cannot
    open the names: here, the client unlinks each region as it makes it."""
    made = shm.Region.__init__

    def unlinked(self, size):
        made(self, size)
        self.shm.unlink()
    monkeypatch.setattr(shm.Region, "__init__", unlinked)
    c = natgrad.Client(shm_server.target)
    ref = c.create_session(**config(np.float64))
    s = c.create_session(**config(np.float64), shared_memory="auto")
    for t in range(1, 4):
        same(ref.step(inputs(t, np.float64)), s.step(inputs(t, np.float64)))
        assert not s.shared_memory
    assert s.info().last_step == 3
    # With True instead of "auto" the same refusal is the caller's to see.
    strict = c.create_session(**config(np.float64), shared_memory=True)
    with pytest.raises(natgrad.InvalidArgument, match="which the server cannot open"):
        strict.step(inputs(1, np.float64))
    assert strict.info().last_step == 0 and strict.shared_memory
    for x in (ref, s, strict):
        x.delete()


def test_auto_replays_after_sigkills_once_inline(server_binary, tmp_path):
    """Steps kept from before the switch and after it replay into a restarted
    server and their answers compare equal (digests over the values)."""
    srv = crashable_server(server_binary, tmp_path, 4)  # no --shared_memory
    try:
        ref = natgrad.Client(srv.target).create_session(**config(np.float64))
        s = patient_client(srv.target).create_session(**config(np.float64), shared_memory="auto")
        for t in range(1, 11):
            same(ref.step(inputs(t, np.float64), loss=1.0 / t),
                 s.step(inputs(t, np.float64), loss=1.0 / t))
            if t in (3, 6):
                srv.crash()
        assert srv.kills == 2 and s.replayed_steps >= 3 + 2
        assert s.info().last_step == 10 and not s.shared_memory
    finally:
        srv.stop()
        srv.cleanup()


@pytest.mark.parametrize("mode", ["sync", "stream", "pipelined"])
def test_torch_kfac_auto_against_a_server_without_shared_memory(target, mode):
    torch = pytest.importorskip("torch")
    import torch.nn as nn
    import torch.nn.functional as F
    import natgrad.torch as ntorch

    def run(shared_memory):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        c = natgrad.Client(target)
        opt = ntorch.KFAC(model, client=c, lr=0.1, momentum=0.9, damping=1e-2,
                          inverse_period=2, reduce=False, stream=mode == "stream",
                          pipelined=mode == "pipelined", shared_memory=shared_memory)
        for t in range(5):
            g = torch.Generator().manual_seed(100 + t)
            x = torch.randn(32, 6, generator=g)
            y = (x[:, 0] > 0).long()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)
        opt.flush()
        assert not opt.session.shared_memory
        out = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opt.close(delete=True)
        c.close()
        return out
    want, got = run(False), run("auto")
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_a_block_list_session_accepts_auto(target):
    c = natgrad.Client(target)
    s = c.create_session([blocks.sgd("b", [3], lr=0.1)], shared_memory="auto")
    assert np.array_equal(s.step({"b": np.ones(3, np.float32)})["b"], np.full(3, -0.1, np.float32))
    assert not s.shared_memory
    s.delete()
