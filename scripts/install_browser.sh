#!/usr/bin/env bash
# Debian's headless-capable Chromium for tests/test_browser.py (Voila + Playwright drive it; the
# playwright package brings only its driver, so no `playwright install`). Does nothing when
# $PMACCEL_CHROMIUM (default /usr/bin/chromium, as in the test) is already there. Needs root or
# password-less sudo.
# Says what it does in one line on stderr; apt's own output goes to a log file. When Chromium cannot
# be installed it prints the reason in one line on stdout and exits 1 (scripts/test.sh then skips
# only the browser test, with that reason).
set -euo pipefail
if [ -x "${PMACCEL_CHROMIUM:-/usr/bin/chromium}" ]; then
    exit 0
fi
fail() {
    printf 'cannot install Chromium: %s\n' "$*"
    exit 1
}
SUDO=()
if [ "$(id -u)" != 0 ]; then
    # -n: never wait for a password (CI has no terminal to type one)
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        fail "not root and no password-less sudo (run scripts/install_browser.sh as root)"
    fi
fi
command -v apt-get >/dev/null 2>&1 || fail "no apt-get here (install Chromium as /usr/bin/chromium)"
log=$(mktemp "${TMPDIR:-/tmp}/pmaccel-apt.XXXXXX")
echo "pmaccel test: installing Debian's Chromium for the browser test (apt-get, ~400 MB; log: $log)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { "${SUDO[@]}" apt-get update -qq &&
       "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
    fail "apt-get failed ($(tail -n 1 "$log"); log: $log)"
fi
/usr/bin/chromium --headless --no-sandbox --disable-gpu --version >>"$log" 2>&1 ||
    fail "/usr/bin/chromium does not start (log: $log)"
