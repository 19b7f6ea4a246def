#!/usr/bin/env bash
# On the GPU machine (no package registry): install, from the offline wheelhouse, what its image lacks
# (bench/gpu/image.txt's `missing`) and the project, into its Python, without touching a `present`
# package (its torch, numpy, ...):
#
#   bench/gpu/install.sh WHEELHOUSE        (bench/gpu/run.sh calls it with bench/gpu/wheels)
#
# Every `present` package is pinned to the version installed, so pip can neither upgrade nor replace
# it; --no-index means the wheelhouse is the only source. Running it again changes nothing but the
# project's own wheel, which is reinstalled (it may be newer). Exits non-zero, saying what is wrong,
# when a package is neither installed nor in the wheelhouse. Knob: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${1:?usage: bench/gpu/install.sh WHEELHOUSE}
PYTHON=${PYTHON:-python3}
source bench/gpu/image_lists.sh

fail() { echo "bench/gpu/install.sh: $*" >&2; exit 1; }
[[ -d $WHEELS ]] || fail "no wheelhouse at $WHEELS: build it beforehand with bench/gpu/wheelhouse.sh $WHEELS (on a machine with an index) and carry it"
project_whl=$(ls -1 "$WHEELS"/cosyserve-*.whl 2>/dev/null | tail -1) \
  || fail "the project's wheel (cosyserve-*.whl) is not in $WHEELS: rebuild it with bench/gpu/wheelhouse.sh"
"$PYTHON" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip"

# Only the wheelhouse and this command line count: no index, no configured find-links or constraints.
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT PIP_NO_DEPS || true

mapfile -t missing < <(image_list missing)
mapfile -t present < <(image_list present)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name==version of every `present` package as installed; a `present` one that is not installed is an
# error (the image differs from image.txt: move it to [missing] and rebuild the wheelhouse).
versions() {
  "$PYTHON" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
absent = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        absent.append(name)
if absent:
    sys.exit(f"bench/gpu/install.sh: bench/gpu/image.txt lists as present, but this Python lacks: "
             f"{' '.join(absent)} (move them to [missing], rebuild the wheelhouse and carry it)")
PY
}
versions "${present[@]}" > "$tmp/present.txt"
echo "== $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])'); kept as they are:" \
  "$(tr '\n' ' ' < "$tmp/present.txt")"

pip_install() { "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" -c "$tmp/present.txt" "$@"; }
# The missing packages and the project's own dependencies (a package already installed that satisfies
# them is kept); then the project's wheel itself, afresh, without its dependencies (done just above).
if ! pip_install "${missing[@]}" "$project_whl" 2>"$tmp/pip.err"; then
  cat "$tmp/pip.err" >&2
  fail "pip could not install from $WHEELS alone (above: what it lacks). Rebuild the wheelhouse with" \
       "bench/gpu/wheelhouse.sh, or fix bench/gpu/image.txt if the image has or lacks something else"
fi
pip_install --no-deps --force-reinstall "$project_whl"

versions "${present[@]}" > "$tmp/after.txt"
cmp -s "$tmp/present.txt" "$tmp/after.txt" \
  || { diff "$tmp/present.txt" "$tmp/after.txt" >&2; fail "a present package changed (above)"; }
echo "== installed from $WHEELS: $(basename "$project_whl") + ${missing[*]} (each unless already there)"
