#!/usr/bin/env bash
# Container entry point: `serve` (default) runs TorchServe in the foreground with the image's
# config and model store; any other command runs as given (e.g. `bash`).
#   TS_CONFIG_FILE        config.properties to use (default /home/model-server/config.properties;
#                         KServe mounts its own at /mnt/models/config/config.properties)
#   TS_MODEL_STORE        archives (default /home/model-server/model-store)
#   TS_DISABLE_TOKEN_AUTH true: no token authorization (something in front authenticates)
set -euo pipefail
if [[ "${1:-serve}" != "serve" ]]; then
  exec "$@"
fi
mkdir -p "${TEMP:-/tmp}"
# libgomp's threads sleep soon after each parallel region instead of holding a core for ~6 ms
# after every forward pass (serving/server.py WORKER_ENV says why); a value set for the container wins.
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-10000}"
args=(--start --foreground --ts-config "${TS_CONFIG_FILE:-/home/model-server/config.properties}"
      --model-store "${TS_MODEL_STORE:-/home/model-server/model-store}")
if [[ "${TS_DISABLE_TOKEN_AUTH:-false}" == "true" ]]; then
  args+=(--disable-token-auth)
fi
exec torchserve "${args[@]}"
