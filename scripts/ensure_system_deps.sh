#!/usr/bin/env bash
# System packages the project needs, from Debian when missing:
#   Java 17+ (TorchServe's frontend) with javac (builds build/ts-patches.jar, the agent fixing
#   the frontend, scripts/ts_patches/): openjdk-17-jdk-headless
#   ASM, the bytecode library the agent bundles: libasm-java (/usr/share/java/asm.jar)
#   Prometheus (the monitoring test scrapes TorchServe with a real one): prometheus
#   curl (an e2e test sends a photo the way the README's curl lines do): curl
#   unzip (scripts/ts_patches/build.sh bundles ASM's classes): unzip
#   Chromium (the page's browser tests drive it with Playwright, tests/test_page.py): chromium
set -euo pipefail
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1; }
javac_major() { javac -version 2>&1 | sed -n 's/^javac \([0-9]*\).*/\1/p' | head -1; }
missing=()
if command -v java >/dev/null 2>&1 && [ "$(java_major)" -ge 17 ] 2>/dev/null \
   && command -v javac >/dev/null 2>&1 && [ "$(javac_major)" -ge 17 ] 2>/dev/null; then
  echo "java $(java_major) and javac $(javac_major) found: $(command -v java)"
else
  missing+=(openjdk-17-jdk-headless)
fi
if [ -f /usr/share/java/asm.jar ]; then
  echo "asm found: /usr/share/java/asm.jar"
else
  missing+=(libasm-java)
fi
if command -v prometheus >/dev/null 2>&1; then
  echo "prometheus found: $(command -v prometheus)"
else
  missing+=(prometheus)
fi
for tool in curl unzip chromium; do
  if command -v "$tool" >/dev/null 2>&1; then
    echo "$tool found: $(command -v "$tool")"
  else
    missing+=("$tool")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get here; install ${missing[*]} yourself (a JDK 17+ on PATH, ASM at /usr/share/java/asm.jar, prometheus on PATH)" >&2
  exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "installed: $(java -version 2>&1 | head -1); $(prometheus --version 2>&1 | head -1)"
