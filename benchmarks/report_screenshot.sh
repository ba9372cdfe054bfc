#!/bin/sh
# The README's picture of a run: builds `grpo report RUN_DIR` and screenshots it with headless Chromium.
#   sh benchmarks/report_screenshot.sh runs/quickstart/20261122-101500 docs/report-quickstart.png [HEIGHT]
# HEIGHT (pixels, default 2000) picks how much of the page is in the picture; the width is 1280.
set -eu
if [ $# -lt 2 ]; then
    echo "usage: sh benchmarks/report_screenshot.sh RUN_DIR OUT.png [HEIGHT]" >&2
    exit 2
fi
run=$1 out=$2 height=${3:-2000}
here=$(cd "$(dirname "$0")/.." && pwd)
browser=
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
done
if [ -z "$browser" ]; then
    echo "no chromium on PATH; install it (e.g. sh tests/setup_browser.sh as root) and run this again" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/.venv/bin/python" -m grpo_cli report "$run" -o "$work/report.html" >/dev/null
mkdir -p "$(dirname "$out")"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/profile" \
    --screenshot="$work/report.png" --window-size="1280,$height" "file://$work/report.html" 2>/dev/null
cp "$work/report.png" "$out"
echo "screenshot: $out"
