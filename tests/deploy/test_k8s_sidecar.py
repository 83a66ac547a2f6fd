"""deploy/k8s/sidecar: a training Job with its own natgrad-server as a native
sidecar, the two sharing a memory-backed /dev/shm (docs/shared_memory.md)."""
import re

import pytest
import yaml

from conftest import (DEPLOY, DOCKERFILE, REPO, TRAINER_DOCKERFILE, Rendered, _kustomize,
                      assert_known_flags, dockerfile_instructions, effective, parse_flag_args,
                      port_of)


SIDECAR = DEPLOY / "k8s" / "sidecar"


@pytest.fixture(scope="module")
def job():
    # The kustomization only lists job.yaml and image tags, so the Job is
    # read as written: these checks need no kubectl (the render is checked
    # below where kubectl exists).
    docs = [d for d in yaml.safe_load_all((SIDECAR / "job.yaml").read_text()) if d]
    return Rendered(docs).one("Job")


def test_kustomize_renders_the_same_job(job):
    rendered = Rendered(_kustomize(SIDECAR)).one("Job")
    assert rendered["spec"]["template"]["spec"]["initContainers"][0]["args"] == \
        job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert rendered["spec"]["template"]["spec"]["volumes"] == \
        job["spec"]["template"]["spec"]["volumes"]


def _pod(job):
    return job["spec"]["template"]["spec"]


def _server(job):
    cs = [c for c in _pod(job).get("initContainers", []) if c["name"] == "natgrad"]
    assert len(cs) == 1
    return cs[0]


def _trainer(job):
    cs = [c for c in _pod(job)["containers"] if c["name"] == "trainer"]
    assert len(cs) == 1
    return cs[0]


def test_the_server_is_a_native_sidecar_with_shared_memory(job, server_flags):
    s = _server(job)
    # restartPolicy Always on an init container: started before the trainer,
    # kept running beside it, stopped when it exits (so the Job completes).
    assert s["restartPolicy"] == "Always"
    flags = parse_flag_args(s["args"])
    assert_known_flags(flags, server_flags, "sidecar server args")
    f = effective(flags)
    assert "shared_memory" in f
    assert f["address"].startswith("127.0.0.1:"), "reachable from inside the pod only"
    assert s["startupProbe"]["grpc"]["port"] == port_of(f["address"])
    # The image's binary, as the base StatefulSet runs it.
    entry = dict(dockerfile_instructions(DOCKERFILE))["ENTRYPOINT"]
    assert s["command"][0] in entry


def test_both_containers_share_one_memory_backed_dev_shm(job):
    pod = _pod(job)
    shm = {v["name"]: v for v in pod["volumes"]}
    for c in (_server(job), _trainer(job)):
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, c["name"]
        vol = shm[mounts[0]["name"]]
        assert vol["emptyDir"]["medium"] == "Memory", c["name"]
    assert len({m["name"] for c in (_server(job), _trainer(job))
                for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}) == 1
    # The same user in both: the trainer's 0600 objects are the server's to open.
    assert pod["securityContext"]["runAsUser"] == 10001
    for c in (_server(job), _trainer(job)):
        assert "runAsUser" not in c.get("securityContext", {}), c["name"]


def test_the_trainer_reaches_the_sidecar_through_shared_memory(job):
    t = _trainer(job)
    # argparse spellings (--kebab-case[=value]), not absl's.
    parsed = [re.fullmatch(r"--([a-z][a-z0-9-]*)(?:=(.*))?", a) for a in t["args"]]
    assert all(parsed), t["args"]
    args = {m.group(1): m.group(2) for m in parsed}
    server = effective(parse_flag_args(_server(job)["args"]))
    assert args["target"] == server["address"]
    assert "shared-memory" in args
    # The command is the trainer image's example, run from its WORKDIR, and
    # takes every flag given here.
    ins = dict(dockerfile_instructions(TRAINER_DOCKERFILE))
    assert ins["WORKDIR"] == "/src"
    script = t["command"][1]
    src = (REPO / script).read_text()
    for name in args:
        assert re.search(rf'"--{re.escape(name)}"', src), f"{script} has no --{name}"
    assert "BooleanOptionalAction" in src  # --shared-memory / --no-progress spellings
