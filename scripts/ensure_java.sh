#!/usr/bin/env bash
# TorchServe's frontend needs Java 17+. Install Debian's OpenJDK 17 JRE when it is missing.
set -euo pipefail
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
if command -v java >/dev/null 2>&1 && [ "$(java_major)" -ge 17 ] 2>/dev/null; then
  echo "java $(java_major) found: $(command -v java)"
  exit 0
fi
echo "Java 17+ not found; installing openjdk-17-jre-headless"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install a Java 17 runtime and put java on PATH" >&2
  exit 1
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openjdk-17-jre-headless >/dev/null
echo "installed: $(java -version 2>&1 | head -1)"
