#!/bin/sh
# Screenshot an HTML report the way a person sees it, with headless Chromium (no network, no GPU).
#
#   scripts/screenshot_report.sh reports/<run-id>/<component>-<dtype>/report.html [out.png] [WIDTHxHEIGHT]
#
# Chromium: Debian `apt-get install -y chromium`; set CHROMIUM=/path/to/chrome to use another build.
# Default window 1400x2000; a taller window (e.g. 1400x6000) captures more of a long page.
set -eu
if [ $# -lt 1 ]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]" >&2
    exit 2
fi
page=$1
out=${2:-${page%.html}.png}
size=${3:-1400x2000}
[ -f "$page" ] || { echo "$0: $page does not exist" >&2; exit 2; }
browser=${CHROMIUM:-}
if [ -z "$browser" ]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then browser=$candidate; break; fi
    done
fi
[ -n "$browser" ] || { echo "$0: no chromium found (apt-get install -y chromium, or set CHROMIUM)" >&2; exit 2; }
abs_page=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
case $out in /*) abs_out=$out ;; *) abs_out=$(pwd)/$out ;; esac
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$abs_out" --window-size="$(echo "$size" | tr x ,)" "file://$abs_page" >/dev/null 2>&1
[ -s "$abs_out" ] || { echo "$0: chromium wrote no screenshot" >&2; exit 1; }
echo "$abs_out"
