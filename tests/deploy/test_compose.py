"""docker-compose.yml and deploy/prometheus/prometheus.yml, read with PyYAML."""
import json
import re

import yaml

from conftest import (DOCKERFILE, REPO, assert_known_flags, dockerfile_instructions,
                      effective, parse_flag_args, port_of)


def _seconds(duration):
    """Compose durations: '30s', '1m30s', '1m', or a bare number of seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"cannot read duration {duration!r}"
    h, m, s = (float(x or 0) for x in parts.groups())
    return 3600 * h + 60 * m + s


def _natgrad_flags(compose):
    """What natgrad-server gets in compose: the image ENTRYPOINT's flags, then
    the service's `command` appended (so later ones win)."""
    entry = json.loads(dict(dockerfile_instructions(DOCKERFILE))["ENTRYPOINT"])
    svc = compose["services"]["natgrad"]
    assert "entrypoint" not in svc, "keep the image's entrypoint"
    cmd = svc.get("command", [])
    assert isinstance(cmd, list), "exec form: a string command goes through no shell but is split"
    return parse_flag_args(entry[1:] + cmd)


def _container_ports(svc):
    out = set()
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def test_services_present(compose):
    assert {"natgrad", "prometheus", "trainer"} <= set(compose["services"])


def test_natgrad_builds_from_the_deploy_dockerfile(compose):
    build = compose["services"]["natgrad"]["build"]
    assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def test_natgrad_flags_exist_in_the_server(compose, server_flags):
    assert_known_flags(_natgrad_flags(compose), server_flags, "Dockerfile ENTRYPOINT + compose command")


def test_natgrad_ports_match_flags(compose):
    f = effective(_natgrad_flags(compose))
    ports = _container_ports(compose["services"]["natgrad"])
    assert ports == {port_of(f["address"]), port_of(f["metrics_address"])}


def test_checkpoints_on_a_named_volume(compose):
    f = effective(_natgrad_flags(compose))
    vols = compose["services"]["natgrad"]["volumes"]
    named = [v for v in vols if isinstance(v, str) and v.split(":")[1] == f["checkpoint_dir"]]
    assert len(named) == 1, f"no volume at {f['checkpoint_dir']}: {vols}"
    name = named[0].split(":")[0]
    assert not name.startswith((".", "/")), "a named volume, not a bind mount"
    assert name in compose.get("volumes", {})
    assert int(f["checkpoint_every_steps"]) > 0


def test_stop_grace_period_exceeds_shutdown_grace(compose, server_flags):
    f = effective(_natgrad_flags(compose))
    grace = float(f.get("shutdown_grace_s", server_flags["shutdown_grace_s"]))
    svc = compose["services"]["natgrad"]
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"
    # Docker's default is 10 s, then SIGKILL in the middle of a checkpoint.
    assert _seconds(svc["stop_grace_period"]) > grace


def test_prometheus_scrapes_natgrad(compose):
    f = effective(_natgrad_flags(compose))
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    mounts = [v.split(":") for v in prom["volumes"]]
    cfg = [m for m in mounts if m[1] == "/etc/prometheus/prometheus.yml"]
    assert len(cfg) == 1
    path = (REPO / cfg[0][0]).resolve()
    assert path == REPO / "deploy" / "prometheus" / "prometheus.yml"
    conf = yaml.safe_load(path.read_text())
    targets = [t for job in conf["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]
               if job.get("metrics_path", "/metrics") == "/metrics"]
    assert f"natgrad:{port_of(f['metrics_address'])}" in targets


def test_trainer_runs_the_digits_example(compose):
    f = effective(_natgrad_flags(compose))
    svc = compose["services"]["trainer"]
    build = svc["build"]
    assert (REPO / build["context"] / build["dockerfile"]).is_file()
    cmd = svc["command"]
    assert cmd[:2] == ["python3", "client/python/examples/digits_kfac.py"]
    assert (REPO / cmd[1]).is_file(), f"{cmd[1]} (written by the Python client work) is missing"
    # Options the example's argparse does not define would stop it at start-up.
    source = (REPO / cmd[1]).read_text()
    for opt in (a.split("=")[0] for a in cmd[2:] if a.startswith("--")):
        assert f'add_argument("{opt}"' in source, f"{cmd[1]} has no option {opt}"
    target = cmd[cmd.index("--target") + 1]
    assert target == f"natgrad:{port_of(f['address'])}"
    assert "natgrad" in svc["depends_on"]
