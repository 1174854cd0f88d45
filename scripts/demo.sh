#!/usr/bin/env bash
# Install what the demo needs, then run it: `jupyter io demo` (a coordinator with its embedded
# Solana ledger, a provider joined to it, a funded demo wallet and JupyterLab, all on this
# machine). Ctrl-C stops everything.
#
#   bash scripts/demo.sh [DEMO ARGS...]
#
# Works on a fresh machine: Node.js when missing (the Lab extension is built at install),
# .venv with torch (CPU build, pinned) and the project's provider and lab extras, and
# bubblewrap (the provider host runs each tenant's kernel in a bwrap sandbox).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh

ensure_apt bubblewrap
ensure_node
ensure_venv "provider,lab"
exec jupyter io demo "$@"
