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

# System packages, installed only when missing (one `apt-get update` at most). With CI set,
# the tests that need them fail rather than skip without them.
#   postgresql  the coordinator store's tests run on a throwaway cluster from its binaries
#   chromium    the Lab browser tests drive Debian's /usr/bin/chromium with Playwright
#               (Playwright's own browser download cannot work here)
#   nodejs      the editable install builds the Lab extension (labextension/, from its
#               yarn.lock, with jupyter-builder's bundled jlpm); only when no `node` is on PATH
APT_PACKAGES=(postgresql chromium)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
command -v node >/dev/null || missing+=(nodejs)
if ((${#missing[@]})); then
    echo "== apt-get install ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== pip install"
# torch first and pinned: this exact version is a CPU build on this machine's disk, while an
# unpinned torch (as the [provider] extra asks for) would pull a multi-GB CUDA build.
pip install --quiet --disable-pip-version-check torch==2.13.0
pip install --quiet --disable-pip-version-check -e ".[provider,test]"

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
