#!/usr/bin/env bash
# What the sidebar's tests need on a fresh machine: Debian's Chromium (no browser download
# works here; playwright-core drives /usr/bin/chromium) and the node packages.
# The built extension in rbee_jupyter/labextension/ is committed, so `pip install` needs no node.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
npm ci --no-audit --no-fund
npm test   # unit tests of the SSE reader (node --test)
