#!/usr/bin/env bash
# The walls between rooms (docs/architecture.md), checked on the sources:
#  - math rooms (server/core, server/linalg, server/engine, every math/ dir)
#    include no protobuf or gRPC header;
#  - only server/service includes gRPC;
#  - the repository's files cite no design document outside it.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail=0
math_dirs="server/core server/linalg server/engine $(find server -type d -name math | sort)"
if hits=$(grep -rnE '#include *[<"](grpc|grpcpp|google/protobuf)|\.pb\.h"' $math_dirs); then
  echo "math rooms include protobuf/gRPC headers:"; echo "$hits"; fail=1
fi
if hits=$(grep -rnE '#include *[<"](grpcpp?/)' server --include=*.h --include=*.cc | grep -v '^server/service/'); then
  echo "gRPC outside server/service:"; echo "$hits"; fail=1
fi
if hits=$(git grep -n "DESIGN\.md" -- . ':!tests/architecture/check_walls.sh' 2>/dev/null); then
  echo "files cite a design document outside the repository:"; echo "$hits"; fail=1
fi
if [ "$fail" -eq 0 ]; then echo "walls hold: $(echo $math_dirs | wc -w) math rooms checked"; fi
exit $fail
