# Demo training client for docker-compose: runs
# client/python/examples/digits_kfac.py against the natgrad service.
#
#   docker build -f deploy/docker/trainer.Dockerfile -t natgrad-trainer:dev .
#
# Debian's Python packages, the same ones the dev/CI machines test the client
# with (scripts/setup), so no PyPI access is needed to build it.
FROM debian:bookworm-slim

# The example's imports: torch (Debian's CPU build, far smaller than PyPI's
# CUDA wheels), scikit-learn (the digits data set ships inside it), tqdm,
# matplotlib (its plot). protobuf-compiler(-grpc): natgrad._build_proto
# generates the natgrad.v1 stubs with Debian's protoc + grpc_python_plugin,
# matching python3-protobuf 3.21.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-numpy python3-grpcio python3-protobuf \
      python3-torch python3-sklearn python3-tqdm python3-matplotlib \
      protobuf-compiler protobuf-compiler-grpc \
 && rm -rf /var/lib/apt/lists/*

# Same layout as the repository: the stub generator finds proto/ at
# client/python/../../proto.
WORKDIR /src
COPY proto/ proto/
COPY client/python/ client/python/
# Generate the stubs now, as root; at run time (non-root, read-only /src) the
# client sees an up-to-date stamp and does not regenerate.
# (Run as a script: it has no package imports, so this needs no client deps.)
RUN python3 client/python/natgrad/_build_proto.py --force \
 && install -d -o 10001 -g 10001 out

ENV PYTHONPATH=/src/client/python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
# The plot goes to /src/out/digits_kfac.png (the example's default, relative
# to the working directory); fetch it with
#   docker compose cp trainer:/src/out/digits_kfac.png .
CMD ["python3", "client/python/examples/digits_kfac.py", "--target", "natgrad:50051"]
