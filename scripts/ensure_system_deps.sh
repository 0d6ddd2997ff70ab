#!/usr/bin/env bash
# System packages the project needs, from Debian when missing:
#   Java 17+ (TorchServe's frontend): openjdk-17-jre-headless
#   Prometheus (the monitoring test scrapes TorchServe with a real one): prometheus
set -euo pipefail
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
missing=()
if command -v java >/dev/null 2>&1 && [ "$(java_major)" -ge 17 ] 2>/dev/null; then
  echo "java $(java_major) found: $(command -v java)"
else
  missing+=(openjdk-17-jre-headless)
fi
if command -v prometheus >/dev/null 2>&1; then
  echo "prometheus found: $(command -v prometheus)"
else
  missing+=(prometheus)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install ${missing[*]} yourself (Java 17+ on PATH, prometheus on PATH)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: $(java -version 2>&1 | head -1); $(prometheus --version 2>&1 | head -1)"
