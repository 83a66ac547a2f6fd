"""deploy/docker/Dockerfile (and the trainer's), read as text.

No Docker engine here, so the one thing a build would catch late -- a shared
library missing from the slim runtime stage -- is checked against the real
binary: every library `ldd natgrad-server` resolves must come from a Debian
package the runtime stage installs (or its dependencies, or the base image).
The dev/CI machines are Debian 12 like the image, so package names agree.
"""
import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (DOCKERFILE, REPO, TRAINER_DOCKERFILE, dockerfile_instructions,
                      effective, parse_flag_args, port_of)

BUILD_DEV_PACKAGES = """libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
    libeigen3-dev libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev prometheus-cpp-dev
    libopenblas-dev liblapacke-dev cmake ninja-build g++""".split()
# Priority-required packages already in debian:bookworm-slim.
SLIM_BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def _stages(path):
    """[(FROM argument, [(instr, arg), ...]), ...]"""
    stages = []
    for instr, arg in dockerfile_instructions(path):
        if instr == "FROM":
            stages.append((arg, []))
        else:
            assert stages, f"{instr} before FROM"
            stages[-1][1].append((instr, arg))
    return stages


def _apt_packages(run_arg):
    m = re.search(r"apt-get install ([^&]*)", run_arg)
    return [t for t in m.group(1).split() if not t.startswith("-")] if m else []


def _entrypoint():
    return json.loads(dict(dockerfile_instructions(DOCKERFILE))["ENTRYPOINT"])


def test_multi_stage_debian_bookworm():
    stages = _stages(DOCKERFILE)
    assert len(stages) == 2
    assert re.fullmatch(r"debian:bookworm\S* AS build", stages[0][0])
    assert stages[1][0].startswith("debian:bookworm-slim")


def test_build_stage_packages_and_cmake_options():
    build = " ".join(a for i, a in _stages(DOCKERFILE)[0][1] if i == "RUN")
    installed = set(_apt_packages(build))
    assert set(BUILD_DEV_PACKAGES) <= installed, set(BUILD_DEV_PACKAGES) - installed
    for opt in ("-DNATGRAD_BUILD_TESTS=OFF", "-DNATGRAD_BUILD_BENCH=OFF", "-DNATGRAD_WITH_CUDA=OFF"):
        assert opt in build.split(), opt


def test_runtime_stage_user_ports_entrypoint():
    runtime = _stages(DOCKERFILE)[1][1]
    d = dict(runtime)
    assert d["USER"].split(":")[0] == "10001"
    assert "HEALTHCHECK" not in d
    f = effective(parse_flag_args(_entrypoint()[1:]))
    exposed = {int(p.split("/")[0]) for i, a in runtime if i == "EXPOSE" for p in a.split()}
    assert exposed == {port_of(f["address"]), port_of(f["metrics_address"])}
    assert f["address"].startswith("0.0.0.0:")  # reachable from outside the container
    assert int(f["checkpoint_every_steps"]) >= 1
    # The binary the entrypoint runs is the one copied from the build stage.
    copies = [a for i, a in runtime if i == "COPY" and a.startswith("--from=build")]
    assert any(a.split()[-1] == _entrypoint()[0] for a in copies), copies
    # The checkpoint directory exists and belongs to the runtime user.
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert re.search(r"install -d -o 10001 -g 10001 .*" + re.escape(f["checkpoint_dir"]), runs)
    assert "useradd" in runs and "--uid 10001" in runs


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, TRAINER_DOCKERFILE], ids=lambda p: p.name)
def test_dockerignore_keeps_what_copy_needs(dockerfile):
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile.
    ignore = Path(str(dockerfile) + ".dockerignore")
    assert ignore.is_file()
    patterns = [l.strip() for l in ignore.read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    assert ".git" in patterns and "build*" in patterns
    for instr, arg in dockerfile_instructions(dockerfile):
        if instr != "COPY" or arg.startswith("--from"):
            continue
        for src in arg.split()[:-1]:
            src = src.rstrip("/")
            assert (REPO / src).exists(), src
            hit = [p for p in patterns if fnmatch.fnmatch(src, p)
                   or any(fnmatch.fnmatch(parent, p) for parent in _parents(src))]
            assert not hit, f"{ignore.name} excludes {src}, which {dockerfile.name} COPYs"


def _parents(rel):
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def test_trainer_image_runs_the_example_as_non_root():
    d = dict(dockerfile_instructions(TRAINER_DOCKERFILE))
    assert d["FROM"].startswith("debian:bookworm")
    assert d["USER"].split(":")[0] == "10001"
    assert json.loads(d["CMD"])[:2] == ["python3", "client/python/examples/digits_kfac.py"]


def _path_spellings(path):
    """A library path as dpkg may have recorded it: merged /usr means the
    package shipped either /lib/... or /usr/lib/..., and ldd may show either
    (or an /etc/alternatives link, hence realpath)."""
    out = []
    for p in (path, os.path.realpath(path)):
        out.append(p)
        if p.startswith("/usr/lib/"):
            out.append(p[len("/usr"):])
        elif p.startswith("/lib/"):
            out.append("/usr" + p)
    return out


def _dpkg_owners(paths):
    """{path: Debian package} for the paths dpkg knows (one dpkg-query call)."""
    res = subprocess.run(["dpkg-query", "-S", *paths], capture_output=True, text=True)
    owners = {}
    for line in res.stdout.splitlines():  # "libfoo1:amd64: /path"
        if line.startswith("diversion"):
            continue
        pkgs, _, path = line.partition(": ")
        owners[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    return owners


def _hard_dependency_closure(packages):
    """Packages apt must install with `packages`: Depends/PreDepends that are
    not alternatives ('a | b') or virtual ('<libblas.so.3>'). Those apt
    resolves to the first candidate -- for liblapacke's BLAS, the slow
    reference libblas3 rather than OpenBLAS -- so anything reached only
    through them has to be listed in the Dockerfile by name."""
    closure, frontier = set(packages), set(packages)
    while frontier:
        res = subprocess.run(
            ["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
             "--no-breaks", "--no-replaces", "--no-enhances", *sorted(frontier)],
            capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        found, in_or_group = set(), False
        for line in res.stdout.splitlines():
            m = re.match(r" ([ |])(?:Pre)?Depends: (\S+)$", line)
            if not m:
                in_or_group = False if not line.startswith(" ") else in_or_group
                continue
            alternative = m.group(1) == "|" or in_or_group
            in_or_group = m.group(1) == "|"  # the group ends at its first plain line
            if not alternative and not m.group(2).startswith("<"):
                found.add(m.group(2).split(":")[0])
        frontier = found - closure
        closure |= found
    return closure


def test_runtime_stage_installs_every_library_the_server_links(server_binary):
    if not all(shutil.which(t) for t in ("ldd", "dpkg-query", "apt-cache")):
        pytest.skip("needs ldd, dpkg-query and apt-cache (a Debian machine)")
    runtime_runs = " ".join(a for i, a in _stages(DOCKERFILE)[1][1] if i == "RUN")
    listed = set(_apt_packages(runtime_runs))
    assert listed, "runtime stage installs no packages"
    res = subprocess.run(["ldd", server_binary], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    libs = dict(re.findall(r"(?m)^\s*(\S+) => (/\S+)", res.stdout))
    owners = _dpkg_owners(sorted({p for path in libs.values() for p in _path_spellings(path)}))

    def owner(lib):
        return next((owners[p] for p in _path_spellings(libs[lib]) if p in owners), None)

    # Libraries from no package: only the CUDA toolkit's, which the local
    # build may link; the image is built with NATGRAD_WITH_CUDA=OFF.
    unowned = [f"{lib} => {path}" for lib, path in libs.items() if owner(lib) is None
               and not ("/cuda" in os.path.realpath(path) or lib.startswith(("libcu", "libnv")))]
    assert not unowned, f"libraries from no Debian package: {unowned}"
    available = listed | _hard_dependency_closure(listed) | SLIM_BASE
    missing = {lib: owner(lib) for lib in libs if owner(lib) and owner(lib) not in available}
    assert not missing, (f"the runtime stage of {DOCKERFILE.name} does not install "
                         f"{sorted(set(missing.values()))} (for {sorted(missing)})")
