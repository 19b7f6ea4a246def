# Sourced by bench/gpu/wheelhouse.sh and bench/gpu/install.sh: image_list present|missing prints that
# section of bench/gpu/image.txt, one normalised distribution name a line (PEP 503: lower case, runs of
# -_. as one -). normalise NAME prints one name so.
IMAGE_TXT=${IMAGE_TXT:-$(dirname "${BASH_SOURCE[0]}")/image.txt}

normalise() { printf '%s\n' "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g'; }

image_list() {
  [[ -f $IMAGE_TXT ]] || { echo "image list not found: $IMAGE_TXT" >&2; return 2; }
  awk -v want="[$1]" '
    { sub(/#.*/, ""); gsub(/[ \t\r]+/, "") }
    /^\[.*\]$/ { on = ($0 == want); next }
    on && $0 != "" { print tolower($0) }
  ' "$IMAGE_TXT" | sed -E 's/[-_.]+/-/g'
}
