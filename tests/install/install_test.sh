#!/usr/bin/env bash
# natgrad as a library, from outside (issue 12): install this build into a
# fresh prefix, move the prefix (installs must be relocatable), then build
#   - consumer/ with CMake, find_package(natgrad) and CMAKE_PREFIX_PATH set to
#     the prefix only: a C++ program on natgrad::client and the C program on
#     natgrad::c (shared) and natgrad::c_static;
#   - consumer/c_consumer.c with plain `cc $(pkg-config --cflags --libs natgrad)`;
# and run all four against the installed natgrad-server (port 0, --port_file).
# Nothing is rebuilt: `cmake --install` copies what the build produced.
#
# Environment (set by tests/install/CMakeLists.txt): NATGRAD_BUILD_DIR,
# NATGRAD_SOURCE_DIR, CMAKE, CC, CXX, PKG_CONFIG, NATGRAD_LIBDIR (relative),
# NATGRAD_GENERATOR, optional NATGRAD_CCACHE.
set -euo pipefail

fail() { echo "install_test: FAIL: $*" >&2; exit 1; }
step() { echo "install_test: $*"; }

work=$(mktemp -d /tmp/natgrad-install-test.XXXXXX)
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill -KILL "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# 1. Install and relocate.
step "cmake --install into $work/staged"
"$CMAKE" --install "$NATGRAD_BUILD_DIR" --prefix "$work/staged" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "cmake --install (build natgrad-server, natgrad_c, natgrad_c_static and natgrad_client first)"; }
mv "$work/staged" "$work/prefix"
prefix="$work/prefix"
libdir="$prefix/$NATGRAD_LIBDIR"
for f in bin/natgrad-server include/natgrad.h include/natgrad/client/natgrad_client.h \
         include/natgrad/client/tensor.h include/natgrad/v1/optimizer_service.grpc.pb.h \
         "$NATGRAD_LIBDIR/libnatgrad_c.so" "$NATGRAD_LIBDIR/libnatgrad_c_static.a" \
         "$NATGRAD_LIBDIR/libnatgrad_client.a" "$NATGRAD_LIBDIR/pkgconfig/natgrad.pc" \
         "$NATGRAD_LIBDIR/cmake/natgrad/natgrad-config.cmake"; do
  [[ -e "$prefix/$f" ]] || fail "not installed: $f"
done
# Nothing installed may point back into the build or source tree.
if grep -rlF -e "$NATGRAD_BUILD_DIR" -e "$NATGRAD_SOURCE_DIR" \
     "$libdir/cmake" "$libdir/pkgconfig" "$prefix/include"; then
  fail "installed files above name the build or source tree"
fi
runpath=$(readelf -d "$libdir/libnatgrad_c.so" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p')
[[ "$runpath" == *'$ORIGIN'* ]] || fail "libnatgrad_c.so RUNPATH is '$runpath', expected \$ORIGIN-relative"

# Compilers and package lookup see the prefix and the system, never the tree.
export CCACHE_BASEDIR="$work" CCACHE_NOHASHDIR=1
launcher=()
if [[ -n "${NATGRAD_CCACHE:-}" ]]; then
  launcher=(-DCMAKE_C_COMPILER_LAUNCHER="$NATGRAD_CCACHE" -DCMAKE_CXX_COMPILER_LAUNCHER="$NATGRAD_CCACHE")
fi
consumer_src="$work/consumer-src"
cp -r "$NATGRAD_SOURCE_DIR/tests/install/consumer" "$consumer_src"

# 2. CMake consumer.
step "configure + build consumer/ with find_package(natgrad)"
"$CMAKE" -S "$consumer_src" -B "$work/cmake-build" -G "$NATGRAD_GENERATOR" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
  "${launcher[@]}" >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log" >&2; fail "configuring the CMake consumer"; }
"$CMAKE" --build "$work/cmake-build" -j 2 >"$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; fail "building the CMake consumer"; }
if grep -F -e "$NATGRAD_BUILD_DIR" -e "$NATGRAD_SOURCE_DIR" \
     "$work/cmake-build/compile_commands.json" "$work/cmake-build/build.ninja" 2>/dev/null; then
  fail "the CMake consumer's build names natgrad's build or source tree (lines above)"
fi
server_from_cmake=$(cat "$work/cmake-build/server_path.txt")
[[ "$server_from_cmake" == "$prefix/bin/natgrad-server" ]] ||
  fail "natgrad::server is '$server_from_cmake', expected $prefix/bin/natgrad-server"

# 3. pkg-config consumer: the plain compiler command line a C user writes.
step "build consumer/c_consumer.c with pkg-config"
export PKG_CONFIG_PATH="$libdir/pkgconfig" PKG_CONFIG_LIBDIR="$libdir/pkgconfig"
cflags=$("$PKG_CONFIG" --cflags natgrad) || fail "pkg-config --cflags natgrad"
libs=$("$PKG_CONFIG" --libs natgrad) || fail "pkg-config --libs natgrad"
pc_libdir=$("$PKG_CONFIG" --variable=libdir natgrad)
[[ "$(cd "$pc_libdir" && pwd -P)" == "$(cd "$libdir" && pwd -P)" ]] ||
  fail "natgrad.pc libdir $pc_libdir is not $libdir"
# shellcheck disable=SC2086  # pkg-config output is meant to be word-split
"$CC" -std=c99 -pedantic-errors -Wall -Wextra -o "$work/c_consumer_pc" "$consumer_src/c_consumer.c" \
  $cflags $libs -lm -Wl,-rpath,"$pc_libdir" || fail "cc with pkg-config flags"
ldd "$work/c_consumer_pc" | grep -F "libnatgrad_c.so" | grep -qF "$prefix" ||
  { ldd "$work/c_consumer_pc" >&2; fail "c_consumer_pc does not load libnatgrad_c.so from the prefix"; }

# 4. Run everything against the installed server.
step "start $prefix/bin/natgrad-server"
port_file="$work/port"
env -u LD_LIBRARY_PATH "$prefix/bin/natgrad-server" --address=127.0.0.1:0 \
  --port_file="$port_file" --inversion_backend=cpu --worker_threads=2 \
  >"$work/server.log" 2>&1 &
server_pid=$!
# Bounded wait for the port file (written once serving), or the server's exit.
for _ in $(seq 1 600); do
  [[ -s "$port_file" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "natgrad-server exited at start-up"; }
  sleep 0.05
done
[[ -s "$port_file" ]] || { cat "$work/server.log" >&2; fail "natgrad-server wrote no port file in 30 s"; }
target="127.0.0.1:$(cat "$port_file")"

run() {
  step "run $1"
  env -u LD_LIBRARY_PATH "$1" "$target" || { cat "$work/server.log" >&2; fail "$1 against $target"; }
}
run "$work/cmake-build/cpp_consumer"
run "$work/cmake-build/c_consumer_shared"
run "$work/cmake-build/c_consumer_static"
run "$work/c_consumer_pc"

kill -TERM "$server_pid"
rc=0
wait "$server_pid" || rc=$?
server_pid=""
[[ $rc -eq 0 ]] || { cat "$work/server.log" >&2; fail "natgrad-server exited with $rc after SIGTERM"; }
step "ok"
