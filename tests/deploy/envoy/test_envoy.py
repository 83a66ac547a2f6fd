"""deploy/envoy/envoy.yaml, checked against Envoy's v3 API types.

envoy-data-plane (PyPI, in .venv-deploy made by scripts/setup-python) holds
message classes generated from Envoy's protos: from_dict rejects unknown
fields and wrong types, including inside typed_config Anys, which is what
`envoy --mode validate` would catch first. No Envoy binary runs on the CI
machines (Debian has no package), so the routing itself is checked by
reading the parsed config: the same routes as the nginx router.
"""
import importlib
from pathlib import Path

import pytest
import yaml

for _m in ("envoy.extensions.filters.network.http_connection_manager.v3",
           "envoy.extensions.filters.http.router.v3",
           "envoy.extensions.upstreams.http.v3"):
    importlib.import_module("envoy_data_plane." + _m)
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap  # noqa: E402
from envoy_data_plane.envoy.config.cluster.v3 import ClusterLbPolicy  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
ENVOY = REPO / "deploy" / "envoy" / "envoy.yaml"
STATEFULSET = REPO / "deploy" / "k8s" / "base" / "statefulset.yaml"
SERVICES = REPO / "deploy" / "k8s" / "base" / "services.yaml"
ROUTER_OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "router" / "kustomization.yaml"

# The routing headers every natgrad client sends (docs/replicas.md).
REPLICA_HEADER = "natgrad-replica"
SESSION_KEY_HEADER = "natgrad-session-key"


@pytest.fixture(scope="module")
def bootstrap():
    return Bootstrap.from_dict(yaml.safe_load(ENVOY.read_text()))


@pytest.fixture(scope="module")
def hcm(bootstrap):
    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (f,) = chain.filters
    assert f.name == "envoy.filters.network.http_connection_manager"
    return f.typed_config.unpack()


def _replicas():
    """natgrad-0..N-1: the router overlay's replica count (else the base's)."""
    sts = yaml.safe_load(STATEFULSET.read_text())
    n = sts["spec"]["replicas"]
    if ROUTER_OVERLAY.exists():
        for patch in yaml.safe_load(ROUTER_OVERLAY.read_text()).get("replicas", []):
            if patch["name"] == sts["metadata"]["name"]:
                n = patch["count"]
    return [f"{sts['metadata']['name']}-{i}" for i in range(n)], sts


def _port_and_headless():
    docs = list(yaml.safe_load_all(SERVICES.read_text()))
    _, sts = _replicas()
    (headless,) = [d for d in docs if d["metadata"]["name"] == sts["spec"]["serviceName"]]
    (grpc,) = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]
    return grpc["port"], headless["metadata"]["name"]


def test_unknown_fields_are_rejected_by_the_checker():
    # The check is only worth something if a typo fails it.
    bad = ENVOY.read_text().replace("stream_idle_timeout", "stream_idle_timout")
    with pytest.raises(Exception, match="stream_idle_timout"):
        Bootstrap.from_dict(yaml.safe_load(bad))


def _endpoints(cluster):
    out = []
    for group in cluster.load_assignment.endpoints:
        for e in group.lb_endpoints:
            a = e.endpoint.address.socket_address
            out.append(f"{a.address}:{a.port_value}")
    return out


def _speaks_http2(cluster):
    opts = cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].unpack()
    return opts.explicit_http_config.http2_protocol_options is not None


def test_each_replica_header_routes_to_that_replica(bootstrap, hcm):
    names, _ = _replicas()
    port, headless = _port_and_headless()
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    routes = hcm.route_config.virtual_hosts[0].routes
    pinned = {}
    for r in routes:
        for h in r.match.headers:
            assert h.name == REPLICA_HEADER
            pinned[h.string_match.exact] = r.route.cluster
    assert sorted(pinned) == sorted(names)
    for name, cluster in pinned.items():
        assert _endpoints(clusters[cluster]) == [f"{name}.{headless}:{port}"]
        assert _speaks_http2(clusters[cluster])


def test_unpinned_calls_are_placed_by_a_ring_hash_of_the_session_key(bootstrap, hcm):
    names, _ = _replicas()
    port, headless = _port_and_headless()
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    routes = hcm.route_config.virtual_hosts[0].routes
    last = routes[-1]
    assert not last.match.headers, "the catch-all must be the last route"
    (policy,) = last.route.hash_policy
    assert policy.header.header_name == SESSION_KEY_HEADER
    ring = clusters[last.route.cluster]
    assert ring.lb_policy == ClusterLbPolicy.RING_HASH
    assert sorted(_endpoints(ring)) == sorted(f"{n}.{headless}:{port}" for n in names)
    assert _speaks_http2(ring)


def test_streams_are_not_timed_out(hcm):
    # Step streams stay open for a whole training run, idle between steps.
    assert hcm.stream_idle_timeout is not None and hcm.stream_idle_timeout.total_seconds() == 0
    for r in hcm.route_config.virtual_hosts[0].routes:
        assert r.route.timeout is not None and r.route.timeout.total_seconds() == 0
