#!/bin/sh
# Installs Debian's chromium for the report's screenshot test (tests/test_report.py) when no
# Chromium is on PATH. Never fails: without a browser that one test is skipped with its reason.
for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no chromium, and installing it needs root and apt-get; the report screenshot test will be skipped"
    exit 0
fi
echo "installing chromium for the report screenshot test (apt-get, at most 10 minutes)"
if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1; then
    echo "note: could not install chromium; the report screenshot test will be skipped"
fi
exit 0
