"""deploy/k8s/overlays/router: three replicas behind an nginx Deployment.

Rendered with `kubectl kustomize`; the router's nginx template is rendered
the way the nginx image's entrypoint does it (envsubst of the NATGRAD_*
variables only) and loaded by Debian's nginx with `nginx -t`.
"""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import K8S_ROUTER, assert_known_flags

# The metadata every natgrad client sends (docs/replicas.md).
REPLICA_HEADER = "natgrad-replica"
SESSION_KEY_HEADER = "natgrad-session-key"


def _var(header):
    return "$http_" + header.replace("-", "_")


def _router(k8s_router):
    return k8s_router.one("Deployment", "natgrad-router")


def _template(k8s_router):
    (cm,) = [c for c in k8s_router.all("ConfigMap")
             if c["metadata"]["name"].startswith("natgrad-router-nginx")]
    return cm["data"]["router.conf.template"]


def test_server_flags_are_unchanged_and_known(k8s_router, server_flags):
    assert_known_flags(k8s_router.flags(), server_flags, "router overlay flagfile")


def test_template_places_every_replica_of_the_statefulset(k8s_router):
    sts = k8s_router.sts
    n = sts["spec"]["replicas"]
    assert n == 3
    text = _template(k8s_router)
    m = re.search(r'split_clients\s+"\$\{' + _var(SESSION_KEY_HEADER)[1:] + r'\}"\s+\$\w+\s*\{(.*?)\}',
                  text, re.S)
    assert m, "no split_clients on the session key"
    targets = re.findall(r"^\s*(?:[\d.]+%|\*)\s+(\S+);", m.group(1), re.M)
    assert targets == [f"{sts['metadata']['name']}-{i}" for i in range(n)]
    # The shares add up to 100% (the last one takes the rest).
    shares = [float(x) for x in re.findall(r"([\d.]+)%", m.group(1))]
    assert len(shares) == n - 1 and sum(shares) < 100
    # Pinned calls: the replica header, restricted to this StatefulSet's pod names.
    assert re.search(r"map\s+\$http_natgrad_replica\s", text)
    assert f'"~^{sts["metadata"]["name"]}-[0-9]+$"' in text
    # Targets are per-pod names of the governing headless Service.
    assert f'.{sts["spec"]["serviceName"]}.' in text


def test_router_pods_and_service(k8s_router):
    dep = _router(k8s_router)
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    svc = k8s_router.one("Service", "natgrad-router")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # The server Services must not select router pods (and vice versa).
    sts_labels = k8s_router.sts["spec"]["template"]["metadata"]["labels"]
    for s in k8s_router.all("Service"):
        sel = s["spec"]["selector"]
        if s["metadata"]["name"] != "natgrad-router":
            assert not all(labels.get(k) == v for k, v in sel.items()), s["metadata"]["name"]
        else:
            assert not all(sts_labels.get(k) == v for k, v in sel.items())
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] == "grpc" and ports["grpc"] == 8080
    assert re.search(r"listen\s+8080\b", _template(k8s_router))
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    # The entrypoint writes conf.d; nginx writes its temp files under /tmp.
    assert {"/etc/nginx/templates", "/etc/nginx/conf.d", "/tmp"} <= mounts
    env = {e["name"] for e in c["env"]}
    used = set(re.findall(r"\$\{(NATGRAD_[A-Z_]+)\}", _template(k8s_router)))
    assert used and used <= env


def test_template_loads_in_nginx(k8s_router, tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        pytest.skip("nginx not installed (scripts/setup installs Debian's nginx-light)")
    text = _template(k8s_router)
    # What the image's envsubst does: only variables set in its environment.
    values = {"NATGRAD_NAMESPACE": "natgrad", "NATGRAD_CLUSTER_DOMAIN": "cluster.local",
              "NATGRAD_RESOLVER": "127.0.0.1"}
    for k, v in values.items():
        text = text.replace("${" + k + "}", v)
    (tmp_path / "router.conf").write_text(text)
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
pid {tmp_path}/nginx.pid;
error_log stderr;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/router.conf;
}}
""")
    res = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(conf)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
