#!/usr/bin/env bash
# Builds the self-contained meterline-interop jar and prints its path (the only
# line on stdout; Maven's output goes to stderr).
#
#   tests/interop/java/build.sh [OUT_DIR]
#
# OUT_DIR defaults to ${METER_CACHE:-$HOME/.cache/meterline}/interop-java. The
# jar is OUT_DIR/meterline-interop.jar; Maven's build directory is
# OUT_DIR/maven (nothing is written into the work tree). The Maven repository is
# ${METER_CACHE:-$HOME/.cache/meterline}/m2, shared with ops/install, so CI
# reuses it. The build is skipped when the jar is newer than pom.xml and every
# file under src/. With a warm repository the build runs offline (-o); only
# when that fails does it go online (Maven Central).
#
# Env: METER_CACHE, MVN (default mvn), INTEROP_FORCE_BUILD=1 to rebuild anyway.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${METER_CACHE:-${HOME:-/root}/.cache/meterline}"
OUT="${1:-$CACHE/interop-java}"
MVN="${MVN:-mvn}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
JAR="$OUT/meterline-interop.jar"
REPO="$CACHE/m2"

up_to_date() {
    [[ -f "$JAR" ]] || return 1
    [[ -z "$(find "$HERE/pom.xml" "$HERE/src" -newer "$JAR" -print -quit)" ]]
}

if [[ "${INTEROP_FORCE_BUILD:-0}" != 1 ]] && up_to_date; then
    echo "$JAR"
    exit 0
fi

mkdir -p "$REPO"
# Lean on a 2-core machine that is also compiling Rust: one Maven thread, a
# small heap, C1 only.
export MAVEN_OPTS="${MAVEN_OPTS:--Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1}"
mvn_args=(-B -q -Dstyle.color=never -f "$HERE/pom.xml"
    -Dmaven.repo.local="$REPO" -Dinterop.build.dir="$OUT/maven" package)

echo "build.sh: building $JAR" >&2
if ! "$MVN" -o "${mvn_args[@]}" >"$OUT/mvn-offline.log" 2>&1; then
    echo "build.sh: offline build failed (see $OUT/mvn-offline.log); retrying online" >&2
    "$MVN" "${mvn_args[@]}" >&2
fi
built="$OUT/maven/meterline-interop-all.jar"
[[ -f "$built" ]] || { echo "build.sh: Maven did not produce $built" >&2; exit 1; }
cp "$built" "$JAR.tmp"
mv "$JAR.tmp" "$JAR"
echo "$JAR"
