#!/usr/bin/env python3
"""Renders deploy/nginx/natgrad.conf.template for a set of natgrad replicas.

    python3 deploy/nginx/render.py --listen 127.0.0.1:8080 --prefix /tmp/ngx \\
        --replica natgrad-0=127.0.0.1:50051 --replica natgrad-1=127.0.0.1:50052 \\
        --out /tmp/ngx/nginx.conf
    nginx -p /tmp/ngx -e stderr -c /tmp/ngx/nginx.conf

Standard library only, so the tests, docker-compose and Kubernetes (an init
container or a ConfigMap generated in CI) can all use it. Replica names are
the servers' --replica_name (what they put in Session.replica); addresses
are host:port as nginx reaches them. Everything nginx writes (pid, logs,
temp files) goes under --prefix, so nginx runs unprivileged.
"""
import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "natgrad.conf.template")

# What a replica name may look like: it becomes a quoted nginx map key, so no
# quotes, whitespace, braces or semicolons. K8s pod names and host names fit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")
_DURATION = re.compile(r"[0-9]+(ms|s|m|h|d)?")
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


def parse_replica(spec):
    """'name=host:port' -> (name, 'host:port')."""
    name, sep, address = spec.partition("=")
    if not sep:
        raise ValueError(f"replica {spec!r}: expected NAME=HOST:PORT")
    return name, address


def render(replicas, listen, prefix, *, daemon=False, worker_processes="auto",
           worker_connections=4096, log_level="warn", access_log=True, error_log=None,
           user=None, stream_timeout="1h", upstream_keepalive=64, template=TEMPLATE,
           header=None):
    """The nginx config text. replicas: [(name, 'host:port')], at least one,
    names and addresses distinct. listen: nginx `listen` address
    ('127.0.0.1:8080', '8080', '[::]:8080'). prefix: absolute directory for
    the pid file, logs and temp files. user: the `user` directive, only
    meaningful when nginx starts as root (the workers otherwise switch to
    nobody, who cannot reach a private prefix)."""
    replicas = [(str(n), str(a)) for n, a in replicas]
    if not replicas:
        raise ValueError("at least one replica is needed")
    for name, address in replicas:
        if not _NAME.fullmatch(name):
            raise ValueError(f"replica name {name!r}: letters, digits, '.', '_' or '-' only")
        m = _ADDRESS.fullmatch(address)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"replica {name!r}: address {address!r} is not HOST:PORT")
    for i, what in ((0, "name"), (1, "address")):
        seen = [r[i] for r in replicas]
        dup = sorted({x for x in seen if seen.count(x) > 1})
        if dup:
            raise ValueError(f"replica {what} {dup[0]!r} given twice")
    if not os.path.isabs(prefix):
        raise ValueError(f"prefix {prefix!r} must be an absolute path")
    if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]:|[A-Za-z0-9._-]+:)?[0-9]{1,5}", str(listen)):
        raise ValueError(f"listen {listen!r}: expected [HOST:]PORT")
    if not _DURATION.fullmatch(str(stream_timeout)):
        raise ValueError(f"stream_timeout {stream_timeout!r}: an nginx duration like 1h or 300s")
    if re.search(r"[\s;{}\"']", prefix):
        raise ValueError(f"prefix {prefix!r}: no whitespace, quotes, braces or ';'")

    prefix = prefix.rstrip("/") or "/"
    upstream_names = [f"natgrad_replica_{i}" for i in range(len(replicas))]
    values = {
        "user": f"user {user};" if user else "# (no `user`: nginx runs as whoever starts it)",
        "daemon": "on" if daemon else "off",
        "worker_processes": str(worker_processes),
        "worker_connections": str(int(worker_connections)),
        "pid_path": os.path.join(prefix, "nginx.pid"),
        "error_log": error_log or os.path.join(prefix, "error.log"),
        "log_level": log_level,
        "access_log": (f"{os.path.join(prefix, 'access.log')} natgrad" if access_log is True
                       else "off" if not access_log else f"{access_log} natgrad"),
        "temp_dir": prefix,
        "listen": str(listen),
        "stream_timeout": str(stream_timeout),
        "upstream_keepalive": str(int(upstream_keepalive)),
        "replica_map": "\n".join(f'        "{n}" {u};' for (n, _), u in zip(replicas, upstream_names)),
        "all_servers": "\n".join(f"        server {a} max_fails=0;  # {n}" for n, a in replicas),
        "replica_upstreams": "\n\n".join(
            f"    upstream {u} {{  # {n}\n"
            f"        server {a} max_fails=0;\n"
            f"        keepalive {max(1, int(upstream_keepalive) // 2)};\n"
            f"        keepalive_timeout 1h;\n"
            f"        keepalive_requests 1000000;\n"
            f"    }}" for (n, a), u in zip(replicas, upstream_names)),
    }
    with open(template) as f:
        text = f.read()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ValueError(f"template {template}: no value for {missing}")
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    return (header.rstrip("\n") + "\n" + text) if header else text


def make_dirs(prefix):
    """The prefix directory (nginx creates its temp subdirectories itself,
    not their parent)."""
    os.makedirs(prefix, exist_ok=True)


GENERATED = "# Generated; edit the template, then rerun: python3 deploy/nginx/render.py"


def _shell_word(x):
    return x if re.fullmatch(r"[A-Za-z0-9_./:=@,+-]+", x) else "'" + x.replace("'", "'\\''") + "'"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replica", action="append", required=True, metavar="NAME=HOST:PORT",
                   help="a natgrad replica (repeat); NAME is its --replica_name")
    p.add_argument("--listen", required=True, help="[HOST:]PORT nginx listens on (HTTP/2 cleartext)")
    p.add_argument("--prefix", required=True, help="absolute directory for pid, logs and temp files")
    p.add_argument("--out", help="write the config here (default: stdout)")
    p.add_argument("--worker_processes", default="auto")
    p.add_argument("--log_level", default="warn")
    p.add_argument("--error_log", help="error log path or 'stderr' (default: PREFIX/error.log)")
    p.add_argument("--access_log", default="on",
                   help="'on' (PREFIX/access.log), 'off', or a path (e.g. /dev/stdout)")
    p.add_argument("--user", help="nginx `user` directive (only used when started as root)")
    p.add_argument("--stream_timeout", default="1h",
                   help="idle time after which nginx closes a Step stream (the client reopens it)")
    p.add_argument("--daemon", action="store_true", help="let nginx fork into the background")
    p.add_argument("--make_dirs", action="store_true", help="create PREFIX")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    access = {"on": True, "off": False}.get(a.access_log, a.access_log)
    try:
        text = render([parse_replica(r) for r in a.replica], a.listen, a.prefix,
                      daemon=a.daemon, worker_processes=a.worker_processes, log_level=a.log_level,
                      access_log=access, error_log=a.error_log, user=a.user,
                      stream_timeout=a.stream_timeout,
                      header=(GENERATED + " " + " ".join(_shell_word(x) for x in argv
                                                        if x != "--make_dirs"))
                      if a.out else None)
    except ValueError as e:
        print(f"render.py: {e}", file=sys.stderr)
        return 2
    if a.make_dirs:
        make_dirs(a.prefix)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
