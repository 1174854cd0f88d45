#!/usr/bin/env bash
# Install what the test suite needs, then run it: ruff, mypy, pytest.
#
#   bash scripts/test.sh [PYTEST ARGS...]
#
# Works on a fresh machine: creates .venv (or reuses it), installs the system packages the
# tests need when they are missing, installs the project with its test extras. CI runs exactly
# this (.ci/run). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k demo -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/setup.sh
. scripts/setup.sh

# System packages, installed only when missing (one `apt-get update` at most). With CI set,
# the tests that need them fail rather than skip without them.
#   postgresql  the coordinator store's tests run on a throwaway cluster from its binaries
#   chromium    the Lab browser tests drive Debian's /usr/bin/chromium with Playwright
#               (Playwright's own browser download cannot work here)
#   bubblewrap  the provider host runs every tenant's kernel in a bwrap sandbox
#   haproxy     examples/haproxy/haproxy.cfg is tested in front of coordinator replicas
#   nodejs      only when no `node` is on PATH (the editable install builds the Lab extension)
ensure_apt postgresql chromium bubblewrap haproxy
ensure_node
ensure_venv "provider,test"

# Every check runs even when an earlier one fails, so one lint slip does not hide the test
# results; the script fails if any check did.
failed=()

echo "== ruff"
ruff check . || failed+=(ruff)

echo "== mypy"
mypy || failed+=(mypy)

echo "== pytest"
# The per-test timeout is pytest-timeout's, set in pyproject.toml; the slowest tests are
# listed so the suite's time (budget: 15 minutes on 2 cores) stays visible.
status=0
pytest --durations=10 "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests; nothing failed"
elif [ "$status" -ne 0 ]; then
    failed+=(pytest)
fi

if ((${#failed[@]})); then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all checks passed"
