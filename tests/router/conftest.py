"""tests/router: natgrad replicas behind Debian's nginx (cluster.py).

The server binary comes from $NATGRAD_SERVER (CTest sets it) or
build/server/natgrad-server; without one every test skips, unless
$NATGRAD_REQUIRE_SERVER=1 (set by CTest), where they fail instead.
"""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # cluster, router_load_client

import natgrad  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _server_binary():
    b = natgrad.find_server_binary()
    if b is None:
        msg = "natgrad-server binary not found (set NATGRAD_SERVER or build build/server/natgrad-server)"
        if os.environ.get("NATGRAD_REQUIRE_SERVER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return b
