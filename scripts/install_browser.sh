#!/usr/bin/env bash
# Debian's headless-capable Chromium for tests/test_browser.py (Voila + Playwright drive it; the
# playwright package brings only its driver, so no `playwright install`). Does nothing when
# /usr/bin/chromium is already there. Needs root or sudo.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --headless --no-sandbox --disable-gpu --version
