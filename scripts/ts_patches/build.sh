#!/usr/bin/env bash
# Builds build/ts-patches.jar: the Java agent fixing TorchServe 0.12's frontend (see src/).
# Needs javac (Debian openjdk-17-jdk-headless) and ASM (Debian libasm-java); both are installed
# by scripts/ensure_system_deps.sh. Usage: scripts/ts_patches/build.sh PYTHON OUT_JAR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${1:?python of the venv}
out=${2:?output jar}
jar_ts=$("$py" -c 'import os, ts; print(os.path.join(os.path.dirname(ts.__file__), "frontend", "model-server.jar"))')
asm=/usr/share/java/asm.jar
javac=$(command -v javac || true)
[ -n "$javac" ] || javac=$(ls /usr/lib/jvm/java-17-openjdk-*/bin/javac 2>/dev/null | head -1)
[ -x "$javac" ] || { echo "javac not found: install openjdk-17-jdk-headless" >&2; exit 1; }
[ -f "$asm" ] || { echo "$asm not found: install libasm-java" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/classes"
"$javac" --release 17 -nowarn -d "$tmp/classes" -cp "$jar_ts:$asm" $(find "$here/src" -name '*.java')
(cd "$tmp/classes" && unzip -q -o "$asm" 'org/objectweb/asm/*')
printf 'Premain-Class: tspatches.Agent\n' > "$tmp/manifest.txt"
mkdir -p "$(dirname "$out")"
"$(dirname "$javac")/jar" cfm "$out.tmp" "$tmp/manifest.txt" -C "$tmp/classes" .
mv "$out.tmp" "$out"
echo "built $out"
