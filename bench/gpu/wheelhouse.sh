#!/usr/bin/env bash
# Build, on a machine with a package index, the offline wheelhouse for the GPU machine (no registry there):
#
#   bench/gpu/wheelhouse.sh DIR        (the GPU run expects DIR = bench/gpu/wheels, which git ignores)
#
# DIR gets cp312 manylinux x86_64 wheels of the packages bench/gpu/image.txt lists as `missing`, plus
# those of their dependencies that it does not list as `present`, and the project itself as a wheel.
# A `present` package is never put in (the image's own build stays). DIR's old *.whl are removed first.
# Knobs: PYTHON (whose pip downloads; default python3), PY_VERSION (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:?usage: bench/gpu/wheelhouse.sh DIR}
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
ABI=cp${PY_VERSION/./}
source bench/gpu/image_lists.sh

mapfile -t missing < <(image_list missing)
mapfile -t present < <(image_list present)
((${#missing[@]})) || { echo "no [missing] packages in $IMAGE_TXT" >&2; exit 2; }
for m in "${missing[@]}"; do
  for p in "${present[@]}"; do
    [[ $m != "$p" ]] || { echo "$m is listed both present and missing in $IMAGE_TXT" >&2; exit 2; }
  done
done

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The project's own version bounds (e.g. websocket-client==1.8.0) bind the downloads too.
"$PYTHON" - > "$tmp/constraints.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + [r for extra, rs in project["optional-dependencies"].items() for r in rs]
print("\n".join(sorted({r.split("#")[0].strip() for r in reqs})))
PY

echo "== downloading (Python $PY_VERSION, manylinux x86_64): ${missing[*]}"
# The GPU image's torch 2.11 wheel is itself manylinux_2_28, so glibc >= 2.28 there.
"$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --python-version "$PY_VERSION" --implementation cp --abi "$ABI" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -c "$tmp/constraints.txt" -d "$tmp/wheels" "${missing[@]}"

# Keep what the image lacks: drop every wheel of a `present` distribution (e.g. numpy, pulled in as a
# dependency of soundfile/soxr).
for whl in "$tmp"/wheels/*.whl; do
  name=$(normalise "$(basename "$whl" | cut -d- -f1)")
  keep=1
  for p in "${present[@]}"; do [[ $name != "$p" ]] || keep=0; done
  if ((keep)); then mv "$whl" "$DIR/"; else echo "   (image has $name: left out)"; fi
done

echo "== the project as a wheel"
had_build=0; [[ -e build ]] && had_build=1
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DIR" .
((had_build)) || rm -rf build  # setuptools' in-tree leftovers (both gitignored)
rm -rf cosyserve.egg-info

echo "== $DIR:"
ls -1 "$DIR"/*.whl | xargs -n1 basename
echo "$(ls -1 "$DIR"/*.whl | wc -l) wheels, $(du -cb "$DIR"/*.whl | tail -1 | cut -f1) bytes"
