"""A small training job for the checkpoint tests, and (run as a script) the
fresh process that resumes it:

    python torch_checkpoint_job.py MODE CHECKPOINT OUT STEPS

starts its own natgrad-server ($NATGRAD_SERVER) on an empty checkpoint
directory, torch.loads CHECKPOINT, restores the job, trains STEPS more steps
and torch.saves the model's state and a few facts to OUT."""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import natgrad
import natgrad.torch


class Job:
    """Model + natgrad (optimizer or preconditioner mode) + torch scheduler."""

    def __init__(self, mode, target):
        torch.manual_seed(0)
        self.mode = mode
        self.model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 8),
                                   nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).float()
        # reduce=False: "auto" picks raw or reduced by timing, so the resumed
        # run and the reference could pick differently and differ in the last bits.
        kw = dict(target=target, damping=1e-2, inverse_period=2, ema_decay=0.9, reduce=False)
        if mode == "optimizer":
            self.ng = natgrad.torch.KFAC(self.model, lr=0.1, momentum=0.9, kl_clip=1e-3, **kw)
            self.opt = self.ng
        else:
            self.ng = natgrad.torch.KFACPreconditioner(self.model, kl_clip=1e-1, **kw)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)

    def step(self, t):
        g = torch.Generator().manual_seed(1000 + t)
        x = torch.randn(32, 1, 6, 6, generator=g, dtype=torch.float32)
        y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.mode == "optimizer":
            self.opt.step(loss=loss)
        else:
            self.ng.step(loss=loss)
            self.opt.step()
        self.sched.step()
        return float(loss)

    def state_dict(self):
        sd = {"model": self.model.state_dict(), "natgrad": self.ng.state_dict(),
              "sched": self.sched.state_dict()}
        if self.mode != "optimizer":
            sd["torch_opt"] = self.opt.state_dict()
        return sd

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd["model"])
        self.ng.load_state_dict(sd["natgrad"])
        if self.mode != "optimizer":
            self.opt.load_state_dict(sd["torch_opt"])
        self.sched.load_state_dict(sd["sched"])


def main(mode, ckpt, out, steps):
    ckpt_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "child-checkpoints")
    os.makedirs(ckpt_dir)
    with natgrad.LocalServer(checkpoint_dir=ckpt_dir,
                             extra_args=["--worker_threads=2", "--shutdown_grace_s=2"]) as srv:
        client = natgrad.Client(srv.target)
        before = [s.name for s in client.list_sessions()]
        sd = torch.load(ckpt)
        job = Job(mode, srv.target)
        fresh = job.ng.session.name
        job.load_state_dict(sd)
        after = [s.name for s in client.list_sessions()]
        start = sd["natgrad"]["natgrad"]["step"]
        for t in range(start, start + int(steps)):
            job.step(t)
        torch.save({"model": job.model.state_dict(), "before": before, "fresh": fresh, "after": after,
                    "session": job.ng.session.name, "last_step": job.ng.last_result.step,
                    "lr": job.opt.param_groups[0]["lr"]}, out)
        job.ng.close()
        client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
