#!/usr/bin/env bash
# Installs the peer load generators that benches/suite.py compares against, into
# benches/.peers/ (git-ignored), never into the project's environment:
#   - oha (Rust HTTP load generator) with `cargo install`, into benches/.peers/oha/bin
#   - GuideLLM in its own virtualenv, benches/.peers/guidellm/bin/guidellm
#   - aiohttp for the Python asyncio baseline, into the current interpreter (bench only)
# Each step is skipped when already done; a step that fails is reported and the suite
# then leaves that peer out and says why.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
peers="$here/.peers"
mkdir -p "$peers"

python -c "import aiohttp" 2>/dev/null || python -m pip install -q aiohttp \
  || echo "setup_peers: aiohttp install failed (asyncio baseline will be skipped)"

if [ ! -x "$peers/oha/bin/oha" ]; then
  cargo install --quiet --locked oha --root "$peers/oha" \
    || echo "setup_peers: oha install failed (oha will be skipped)"
fi

if [ ! -x "$peers/guidellm/bin/guidellm" ]; then
  python -m venv "$peers/guidellm" \
    && "$peers/guidellm/bin/pip" install -q guidellm \
    || echo "setup_peers: guidellm install failed (GuideLLM will be skipped)"
fi
echo "setup_peers: done ($peers)"
