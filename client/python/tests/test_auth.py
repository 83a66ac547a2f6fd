"""Bearer tokens and TLS from the Python client (servers of their own)."""
import shutil
import subprocess

import pytest

import natgrad
from natgrad import blocks


def test_bearer_token(server_binary, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret-token-aaaaaaaa tenant-a\ns3cret-token-bbbbbbbb tenant-b\n")
    with natgrad.LocalServer(server_binary, extra_args=[f"--auth_tokens_file={tokens}",
                                                        "--shutdown_grace_s=2"]) as srv:
        with pytest.raises(natgrad.Unauthenticated):
            natgrad.Client(srv.target).create_session([blocks.sgd("w", [2], lr=0.1)])
        with pytest.raises((natgrad.Unauthenticated, natgrad.PermissionDenied)):
            natgrad.Client(srv.target, token="wrong-token-0123456789").list_sessions()
        a = natgrad.Client(srv.target, token="s3cret-token-aaaaaaaa")
        b = natgrad.Client(srv.target, token="s3cret-token-bbbbbbbb")
        s = a.create_session([blocks.sgd("w", [2], lr=0.1)])
        assert s.step({"w": [1.0, 2.0]}).step == 1
        # Tenants do not see each other's sessions.
        assert s.name not in [x.name for x in b.list_sessions()]
        with pytest.raises((natgrad.NotFound, natgrad.PermissionDenied)):
            b.get_session_info(s.name)
        s.delete()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(server_binary, tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    srv = natgrad.LocalServer(server_binary, extra_args=[f"--tls_cert={crt}", f"--tls_key={key}",
                                                         "--shutdown_grace_s=2"])
    # LocalServer's readiness probe is plaintext; with TLS wait on our own channel.
    srv._probe = False
    with srv:
        c = natgrad.Client(srv.target, tls={"ca": str(crt)})
        s = c.create_session([blocks.sgd("w", [2], lr=0.1)])
        assert s.step({"w": [1.0, 2.0]}).step == 1
        s.delete()
        with pytest.raises(natgrad.Unavailable):
            natgrad.Client(srv.target, timeout=3,
                           retry=natgrad.RetryPolicy(max_attempts=1, deadline_s=1)).list_sessions()
