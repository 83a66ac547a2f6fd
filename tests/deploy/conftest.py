"""Shared fixtures for the deploy-file tests.

No Docker engine or Kubernetes cluster runs on the dev/CI machines, so the
deploy files are checked statically: kustomize renders the manifests, PyYAML
reads docker-compose.yml, and every server flag they use is looked up in the
real binary's `--helpfull` (NATGRAD_SERVER, set by CTest).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S_BASE = DEPLOY / "k8s"
K8S_GPU = DEPLOY / "k8s" / "overlays" / "gpu"
K8S_ROUTER = DEPLOY / "k8s" / "overlays" / "router"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
TRAINER_DOCKERFILE = DEPLOY / "docker" / "trainer.Dockerfile"
COMPOSE = REPO / "docker-compose.yml"

# ---------------------------------------------------------------- flags


def parse_flag_args(args):
    """['--a=1', '--b', 'x', ...] -> [(name, value or None), ...] in order.

    Only the --name=value spelling is used in our files (absl also takes
    '--name value', which is ambiguous to read); anything else is returned as
    a positional (None, arg) so tests can reject it.
    """
    out = []
    for a in args:
        m = re.fullmatch(r"--?([A-Za-z_][A-Za-z0-9_]*)(?:=(.*))?", a, re.S)
        out.append((m.group(1), m.group(2)) if m else (None, a))
    return out


def parse_flagfile(text):
    """absl flagfile: blank lines and '#' comments skipped, one flag a line."""
    args = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        args.append(s)
    return parse_flag_args(args)


def effective(flags):
    """Last value wins, as in absl (flags after --flagfile override it)."""
    return {name: value for name, value in flags if name is not None}


def port_of(address):
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"not host:port: {address!r}"
    return int(port)


def _server_binary():
    env = os.environ.get("NATGRAD_SERVER")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"NATGRAD_SERVER={env} is not an executable")
        return env
    default = REPO / "build" / "server" / "natgrad-server"
    if os.access(default, os.X_OK):
        return str(default)
    pytest.skip("natgrad-server not built: set NATGRAD_SERVER (CTest does)")


@pytest.fixture(scope="session")
def server_binary():
    return _server_binary()


@pytest.fixture(scope="session")
def server_flags(server_binary):
    """{flag name: default text} from `natgrad-server --helpfull`.

    absl prints each flag as '    --name (help...); default: value;' with
    help continuation lines indented further; it exits 1 after --helpfull.
    """
    res = subprocess.run([server_binary, "--helpfull"], capture_output=True,
                         text=True, timeout=60)
    text = res.stdout + res.stderr
    flags = {}
    blocks = re.split(r"(?m)^ {4}(?=--[A-Za-z_])", text)
    for b in blocks[1:]:
        m = re.match(r"--([A-Za-z_][A-Za-z0-9_]*) \(", b)
        if not m:
            continue
        d = re.search(r"default: (.*?);\s*$", " ".join(b.split()) + "\n", re.S)
        flags[m.group(1)] = d.group(1).strip('"') if d else None
    assert "address" in flags and "flagfile" in flags, (
        f"could not parse `{server_binary} --helpfull`:\n{text[:2000]}")
    return flags


def assert_known_flags(flags, server_flags, where):
    positional = [v for n, v in flags if n is None]
    assert not positional, f"{where}: not --flag=value: {positional}"
    unknown = sorted({n for n, _ in flags
                      if n not in server_flags
                      # absl's --noBOOL spelling
                      and not (n.startswith("no") and n[2:] in server_flags)})
    assert not unknown, (f"{where}: natgrad-server has no flag(s) {unknown} "
                         f"(see `natgrad-server --helpfull`, docs/server-flags.md)")


# ---------------------------------------------------------------- kustomize


def _kustomize(path):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        # kubectl is not in Debian 12's archive; the project's machines (and
        # CI) ship it. Elsewhere these render checks cannot run: say so.
        pytest.skip("kubectl not found on PATH: install kubectl to render deploy/k8s "
                    "with `kubectl kustomize` (the dev/CI machines have it)")
    res = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


class Rendered:
    """One kustomize build, with lookups by kind/name."""

    def __init__(self, docs):
        self.docs = docs

    def all(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, name=None):
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def sts(self):
        return self.one("StatefulSet")

    @property
    def pod(self):
        return self.sts["spec"]["template"]["spec"]

    @property
    def container(self):
        cs = [c for c in self.pod["containers"] if c["name"] == "natgrad"]
        assert len(cs) == 1
        return cs[0]

    def flagfile(self):
        """(mount path of the flagfile, its text) as the container sees it."""
        c, pod = self.container, self.pod
        ff = [v for n, v in parse_flag_args(c.get("args", [])) if n == "flagfile"]
        assert len(ff) == 1, f"expected one --flagfile in args: {c.get('args')}"
        path = ff[0]
        mounts = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, f"--flagfile={path} is not under a volume mount"
        key = path[len(mounts[0]["mountPath"].rstrip("/")) + 1:]
        vol = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        assert "configMap" in vol, f"{path} is not mounted from a ConfigMap"
        cm = self.one("ConfigMap", vol["configMap"]["name"])
        assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
        return path, cm["data"][key]

    def flags(self):
        """Flags in the order natgrad-server parses them: the command's own
        arguments, with the flagfile's contents at the --flagfile position."""
        _, text = self.flagfile()
        out = []
        for n, v in parse_flag_args(self.container.get("args", [])):
            out.extend(parse_flagfile(text) if n == "flagfile" else [(n, v)])
        return out


@pytest.fixture(scope="session")
def k8s_base():
    return Rendered(_kustomize(K8S_BASE))


@pytest.fixture(scope="session")
def k8s_gpu():
    return Rendered(_kustomize(K8S_GPU))


@pytest.fixture(scope="session")
def k8s_router():
    return Rendered(_kustomize(K8S_ROUTER))


@pytest.fixture(scope="session", params=["base", "gpu"])
def k8s(request, k8s_base, k8s_gpu):
    return {"base": k8s_base, "gpu": k8s_gpu}[request.param]


# ---------------------------------------------------------------- docker


def dockerfile_instructions(path):
    """[(INSTRUCTION, argument text)] with line continuations joined."""
    out, buf = [], ""
    for line in Path(path).read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="session")
def compose():
    return yaml.safe_load(COMPOSE.read_text())
