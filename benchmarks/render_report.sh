#!/usr/bin/env bash
# Render a `locconf eval --html` report in headless Chromium and save a screenshot.
#
#   benchmarks/render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
#
# Needs Debian's chromium (apt-get install -y chromium). The report is self-contained (images are
# base64 PNG, the style sheet inline), so Chromium is started with everything that could reach the
# network switched off; a fresh profile is created and removed. The screenshot is then shrunk to
# at most 1000 px wide, 8-bit palette, so that it stays small enough for the README (< 500 KB),
# with Pillow from $PYTHON (default: the repository's .venv, else python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$repo/.venv/bin/python" ]; then python=${PYTHON:-$repo/.venv/bin/python}; else python=${PYTHON:-python3}; fi
report=${1:?usage: render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]}
out=${2:?usage: render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]}
size=${3:-1280x2000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "chromium not found: apt-get install -y chromium" >&2
    exit 2
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
shot="$profile/shot.png"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --screenshot="$shot" --window-size="${size/x/,}" \
    "file://$(realpath "$report")" >/dev/null 2>&1
"$python" - "$shot" "$out" <<'PY'
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB")
if im.width > 1000:
    im = im.resize((1000, round(im.height * 1000 / im.width)), Image.LANCZOS)
im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(sys.argv[2], optimize=True)
print(f"{sys.argv[2]}: {im.width}x{im.height}")
PY
