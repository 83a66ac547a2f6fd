"""Full checkpoints of natgrad.torch: state_dict() embeds the exported
session; load_state_dict() imports it (fresh server) or verifies it (server
that has it). Real servers; the resume runs in a fresh Python process."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import natgrad  # noqa: E402
import natgrad.torch  # noqa: E402
from torch_checkpoint_job import Job  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)


@pytest.mark.parametrize("mode", ["optimizer", "preconditioner"])
def test_resume_in_a_fresh_process_and_server_is_bit_identical(target, server_binary, tmp_path, mode):
    job = Job(mode, target)
    for t in range(5):
        job.step(t)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(job.state_dict(), ckpt)
    for t in range(5, 10):  # the uninterrupted run
        job.step(t)
    want = job.model.state_dict()
    out = tmp_path / "out.pt"
    env = dict(os.environ, NATGRAD_SERVER=server_binary,
               PYTHONPATH=os.pathsep.join([PKG, HERE, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(HERE, "torch_checkpoint_job.py"), mode, str(ckpt),
                        str(out), "5"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.load(out)
    assert got["before"] == []  # the child's server started empty
    assert got["session"] == job.ng.session.name  # imported under its own name
    assert got["after"] == [job.ng.session.name]  # and the unused fresh session deleted
    assert got["fresh"] != job.ng.session.name
    assert got["last_step"] == 10
    assert got["lr"] == job.opt.param_groups[0]["lr"]
    for k, v in want.items():
        assert torch.equal(got["model"][k], v), k
    job.ng.close(delete=True)


def test_load_into_a_server_that_has_the_session_checks_the_step(target):
    job = Job("optimizer", target)
    for t in range(3):
        job.step(t)
    sd = job.ng.state_dict()
    name = job.ng.session.name
    assert sd["natgrad"]["step"] == 3 and sd["natgrad"]["session"] == name
    job.ng.load_state_dict(sd)  # the same session at the same step: fine
    assert job.ng.session.name == name and job.ng.session.next_step == 4
    for t in range(3, 5):
        job.step(t)
    with pytest.raises(natgrad.FailedPrecondition, match="step 5.*step 3"):
        job.ng.load_state_dict(sd)
    # Another process' optimizer: the same check; its own session survives the failure.
    other = Job("optimizer", target)
    own = other.ng.session.name
    with pytest.raises(natgrad.FailedPrecondition, match="step 5.*step 3"):
        other.ng.load_state_dict(sd)
    assert other.ng.session.name == own
    assert own in [s.name for s in other.ng.client.list_sessions()]
    # Once the server has no such session, the checkpoint is imported.
    job.ng.close(delete=True)
    other.load_state_dict({"model": Job("optimizer", target).model.state_dict(), "natgrad": sd,
                           "sched": job.sched.state_dict()})
    assert other.ng.session.name == name and other.ng.session.next_step == 4
    assert own not in [s.name for s in other.ng.client.list_sessions()]
    other.step(3)
    assert other.ng.last_result.step == 4
    other.ng.close(delete=True)


def test_load_rejects_mismatches(target):
    job = Job("optimizer", target)
    job.step(0)
    sd = job.ng.state_dict()
    # A different model.
    torch.manual_seed(0)
    wrong = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 9),
                          nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3))
    opt = natgrad.torch.KFAC(wrong, target=target)
    with pytest.raises(natgrad.FailedPrecondition, match="block '3'") as e:
        opt.load_state_dict(sd)
    assert e.value.block == "3"
    opt.close(delete=True)
    # The other mode.
    pre = Job("preconditioner", target).ng
    with pytest.raises(natgrad.FailedPrecondition, match="optimizer"):
        pre.load_state_dict({"natgrad": sd["natgrad"]})
    # A damaged snapshot, an old-style (name only) state dict.
    bad = {**sd, "natgrad": {**sd["natgrad"], "snapshot": b"\xff" * 20}}
    with pytest.raises(natgrad.InvalidArgument, match="snapshot"):
        job.ng.load_state_dict(bad)
    old = {**sd, "natgrad": {"session": sd["natgrad"]["session"], "next_step": 2}}
    with pytest.raises(natgrad.InvalidArgument, match="snapshot"):
        job.ng.load_state_dict(old)
    # param_groups of another layout.
    with pytest.raises(natgrad.FailedPrecondition, match="param_groups"):
        job.ng.load_state_dict({**sd, "param_groups": sd["param_groups"][:1]})
    assert job.ng.session.next_step == 2  # nothing changed
    job.step(1)
    assert job.ng.last_result.step == 2
    job.ng.close(delete=True)
    pre.close(delete=True)


def test_state_dict_survives_torch_save_with_a_float64_model(target, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    opt = natgrad.torch.KFAC(model, target=target, state_dtype="float64")
    x = torch.randn(8, 4, dtype=torch.float64)
    opt.zero_grad()
    F.mse_loss(model(x), torch.zeros(8, 3, dtype=torch.float64)).backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    sd = torch.load(tmp_path / "o.pt")
    assert isinstance(sd["natgrad"]["snapshot"], bytes) and sd["natgrad"]["step"] == 1
    opt.load_state_dict(sd)
    opt.close(delete=True)
