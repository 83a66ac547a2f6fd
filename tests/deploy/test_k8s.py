"""deploy/k8s (base) and deploy/k8s/overlays/gpu, rendered with `kubectl kustomize`."""
import json

from conftest import (DOCKERFILE, assert_known_flags, dockerfile_instructions,
                      effective, port_of)


def _mem_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    for u, f in units.items():
        if str(q).endswith(u):
            return int(float(str(q)[:-len(u)]) * f)
    return int(q)


def _labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_flag_exists_in_the_server(k8s, server_flags):
    assert_known_flags(k8s.flags(), server_flags, "k8s container args + flagfile")


def test_command_replaces_the_image_entrypoint_flags(k8s):
    # Without `command`, Kubernetes keeps the image ENTRYPOINT (with its own
    # flags) and appends args: two sources of truth.
    entry = json.loads(dict(dockerfile_instructions(DOCKERFILE))["ENTRYPOINT"])
    assert k8s.container["command"] == entry[:1]
    path, _ = k8s.flagfile()
    assert path == "/etc/natgrad/flags"


def test_ports_flags_probes_and_services_agree(k8s):
    f = effective(k8s.flags())
    grpc, metrics = port_of(f["address"]), port_of(f["metrics_address"])
    ports = {p["name"]: p["containerPort"] for p in k8s.container["ports"]}
    assert ports == {"grpc": grpc, "metrics": metrics}
    # Native gRPC probes (grpc.health.v1) on the gRPC port; no exec/http.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = k8s.container[probe]
        assert set(p) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, probe
        assert p["grpc"]["port"] == grpc, probe
    ann = k8s.sts["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == metrics
    assert ann["prometheus.io/path"] == "/metrics"
    pod_labels = k8s.sts["spec"]["template"]["metadata"]["labels"]
    for svc in k8s.all("Service"):
        assert _labels_match(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]
        sp = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert len(sp) == 1 and sp[0]["targetPort"] in ("grpc", grpc)


def test_headless_and_clusterip_services(k8s):
    headless = k8s.one("Service", k8s.sts["spec"]["serviceName"])
    # Per-pod DNS (natgrad-N.<headless>.<ns>.svc) needs the governing
    # Service to be headless.
    assert headless["spec"]["clusterIP"] == "None"
    vip = [s for s in k8s.all("Service") if s["spec"].get("clusterIP") != "None"]
    assert len(vip) == 1 and vip[0]["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_security_context_is_non_root_and_locked_down(k8s):
    pod_sc, c_sc = k8s.pod["securityContext"], k8s.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001 and pod_sc["runAsGroup"] == 10001
    assert pod_sc["fsGroup"] == 10001  # the PV is root-owned when created
    assert c_sc["readOnlyRootFilesystem"] is True
    assert c_sc["allowPrivilegeEscalation"] is False
    assert c_sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in c_sc["capabilities"]
    assert c_sc.get("runAsUser", 10001) == 10001
    # Same uid as the image's USER.
    user = dict(dockerfile_instructions(DOCKERFILE))["USER"]
    assert user.split(":")[0] == "10001"


def test_termination_grace_exceeds_server_shutdown_grace(k8s):
    f = effective(k8s.flags())
    # Explicit in the flagfile: a silently changed default must not break this.
    assert "shutdown_grace_s" in f
    assert k8s.pod["terminationGracePeriodSeconds"] > int(f["shutdown_grace_s"])


def test_checkpoints_on_a_per_pod_volume(k8s):
    f = effective(k8s.flags())
    ckpt = f["checkpoint_dir"]
    assert int(f.get("checkpoint_every_steps", "0")) > 0
    mounts = {m["mountPath"]: m for m in k8s.container["volumeMounts"]}
    assert ckpt in mounts and not mounts[ckpt].get("readOnly", False)
    claims = {c["metadata"]["name"]: c for c in k8s.sts["spec"]["volumeClaimTemplates"]}
    claim = claims[mounts[ckpt]["name"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    # Every other writable path is a scratch volume, since the root fs is RO.
    for m in k8s.container["volumeMounts"]:
        if m["mountPath"] != ckpt and not m.get("readOnly", False):
            vol = next(v for v in k8s.pod["volumes"] if v["name"] == m["name"])
            assert "emptyDir" in vol, m


def test_resources_bound_session_memory(k8s):
    res = k8s.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), kind
    f = effective(k8s.flags())
    # All sessions at their byte cap must fit the memory limit, or the OOM
    # killer loses every session's steps since its last checkpoint.
    worst = int(f["max_sessions"]) * int(f["max_session_bytes"])
    assert worst < _mem_bytes(res["limits"]["memory"])


def test_pod_disruption_budget(k8s):
    pdb = k8s.one("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    pod_labels = k8s.sts["spec"]["template"]["metadata"]["labels"]
    assert _labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    # A budget that allows no disruption at all blocks every node drain.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or (
        pdb["spec"]["minAvailable"] < k8s.sts["spec"]["replicas"])


def test_gpu_overlay_requests_a_gpu_and_the_cuda_backend(k8s_base, k8s_gpu):
    assert "nvidia.com/gpu" not in k8s_base.container["resources"].get("limits", {})
    assert int(k8s_gpu.container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert effective(k8s_base.flags())["inversion_backend"] == "cpu"
    assert effective(k8s_gpu.flags())["inversion_backend"] in ("cuda", "auto")
    # The overlay changes only what it must: same flagfile, ports, probes.
    assert k8s_gpu.flagfile() == k8s_base.flagfile()
    for key in ("ports", "startupProbe", "readinessProbe", "livenessProbe",
                "securityContext", "volumeMounts"):
        assert k8s_gpu.container[key] == k8s_base.container[key], key
