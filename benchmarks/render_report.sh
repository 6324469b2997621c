#!/usr/bin/env bash
# Render a `locconf eval --html` report (or any page or image) in headless Chromium and save a screenshot;
# or make the documentation's screenshots (docs/screenshots/) from a checkpoint.
#
#   benchmarks/render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]
#   benchmarks/render_report.sh screenshots CONFIG CHECKPOINT IMAGE [OUT_DIR]
#
# The second form runs `locconf eval CONFIG --checkpoint CHECKPOINT --html --gallery 6` and `locconf
# predict IMAGE --checkpoint CHECKPOINT`, then renders into OUT_DIR (default docs/screenshots):
# report.png (the top of the report: tables), report_gallery.png (the report's gallery of detections,
# alone on a page with the report's style) and predict.png (the bottom-left 800 x 600 px of predict's
# drawing of IMAGE at full size, with its legend). With SCREENSHOTS_WORK=DIR the eval and predict
# outputs are kept in DIR and reused by the next run. The screenshots of docs/screenshots/ were made with
#
#   benchmarks/render_report.sh screenshots CONFIG runs/accuracy_neon/baseline/it1500_seed0/checkpoint_0001500.pth \
#       ~/.cache/locconf/deepforest-2.1.0/2019_YELL_2_528000_4978000_image_crop2.png
#
# where CONFIG is that run's config.yaml with data.root pointing at the NEON data (`locconf data
# neon-trees`): the baseline Faster R-CNN of the NEON comparison (pretrained EfficientNet-Lite0,
# 1500 iterations, seed 0; no quality head, so the gallery is coloured by score), and the whole
# 2299 x 2472 px YELL orthomosaic that `locconf data neon-trees` tiles (its top part is training data).
#
# Needs Debian's chromium (apt-get install -y chromium). The report is self-contained (images are
# base64 PNG, the style sheet inline), so Chromium is started with everything that could reach the
# network switched off; a fresh profile is created and removed. Each screenshot is then shrunk to
# at most 1000 px wide (800 for the gallery), a palette of 256 colours (64 for the photographs), so that
# it stays small (< 300 KB), with Pillow from $PYTHON
# (default: the repository's .venv, else python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$repo/.venv/bin/python" ]; then python=${PYTHON:-$repo/.venv/bin/python}; else python=${PYTHON:-python3}; fi
usage="usage: render_report.sh REPORT.html OUT.png [WIDTHxHEIGHT] | render_report.sh screenshots CONFIG CHECKPOINT IMAGE [OUT_DIR]"

render() {  # render PAGE OUT.png WIDTHxHEIGHT [COLOURS [MAX_WIDTH]]
    local page=$1 out=$2 size=$3 colours=${4:-256} max_width=${5:-1000} browser profile shot
    browser=$(command -v chromium || command -v chromium-browser || true)
    if [ -z "$browser" ]; then
        echo "chromium not found: apt-get install -y chromium" >&2
        exit 2
    fi
    profile=$(mktemp -d)
    shot="$profile/shot.png"
    timeout 300 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$profile" --hide-scrollbars --screenshot="$shot" --window-size="${size/x/,}" \
        "file://$(realpath "$page")" >/dev/null 2>&1 || true
    if [ ! -s "$shot" ]; then
        rm -rf "$profile"
        echo "chromium wrote no screenshot of $page" >&2
        exit 1
    fi
    "$python" - "$shot" "$out" "$colours" "$max_width" <<'PY'
import os
import sys
from PIL import Image
im = Image.open(sys.argv[1]).convert("RGB")
width = int(sys.argv[4])
if im.width > width:
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
im.quantize(colors=int(sys.argv[3]), method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(sys.argv[2], optimize=True)
print(f"{sys.argv[2]}: {im.width}x{im.height}, {os.path.getsize(sys.argv[2]) // 1024} KB")
PY
    rm -rf "$profile"
}

if [ "${1:-}" != "screenshots" ]; then
    report=${1:?$usage}
    out=${2:?$usage}
    render "$report" "$out" "${3:-1280x2000}"
    exit 0
fi

config=${2:?$usage}
checkpoint=${3:?$usage}
image=${4:?$usage}
out_dir=${5:-$repo/docs/screenshots}
locconf=$(dirname "$python")/locconf
[ -x "$locconf" ] || locconf=locconf
if [ -n "${SCREENSHOTS_WORK:-}" ]; then
    work=$SCREENSHOTS_WORK
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$out_dir"
[ -s "$work/report.html" ] || "$locconf" eval "$config" --checkpoint "$checkpoint" --out "$work/eval" \
    --html "$work/report.html" --gallery 6 --no-progress
[ -s "$work/predict.png" ] || "$locconf" predict "$image" --checkpoint "$checkpoint" --config "$config" \
    --out "$work/predict.png" --no-progress
# the gallery alone, with the report's style: from <h2>Detections</h2> to the end of its grid
"$python" - "$work/report.html" "$work/gallery.html" <<'PY'
import re
import sys
text = open(sys.argv[1], encoding="utf-8").read()
head = text[:text.index("<body>") + len("<body>")]
start = text.index("<h2>Detections</h2>")
end = text.index("</div>", start) + len("</div>")
open(sys.argv[2], "w", encoding="utf-8").write(head + "\n" + text[start:end] + "\n</body></html>\n")
PY
# predict's drawing at full size: its bottom-left corner, legend row included
cat > "$work/predict.html" <<'HTML'
<!DOCTYPE html><html><body style="margin:0;overflow:hidden">
<img src="predict.png" style="position:absolute;left:0;bottom:0" alt="predict"></body></html>
HTML
render "$work/report.html" "$out_dir/report.png" 1280x1700
render "$work/gallery.html" "$out_dir/report_gallery.png" 960x1010 64 800
render "$work/predict.html" "$out_dir/predict.png" 800x600 64
ls -l "$out_dir"
