# Shared set-up for scripts/test.sh and scripts/demo.sh (sourced, not run).
#
#   ensure_apt PKG...         install the Debian packages that are missing (one `apt-get
#                             update` at most; with sudo when not root)
#   ensure_node               Debian's nodejs when no `node` is on PATH: the editable install
#                             builds the Lab extension (labextension/, from its yarn.lock, with
#                             jupyter-builder's bundled jlpm)
#   ensure_venv EXTRAS        create or reuse .venv, activate it, install torch (pinned, first)
#                             and the project with EXTRAS, e.g. "provider,test"

ensure_apt() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "== apt-get install ${missing[*]}"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        if [ -z "${_JIO_APT_UPDATED:-}" ]; then
            $sudo apt-get update -qq
            _JIO_APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
}

ensure_node() {
    command -v node >/dev/null || ensure_apt nodejs
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        "${PYTHON:-python3}" -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
    echo "== pip install"
    # torch first and pinned, so the [provider] extra finds it installed: an unpinned torch
    # resolves on Linux to the multi-GB CUDA build. The scripts pin the CPU build the tests and
    # the demo's simulated GPUs need; on a GPU machine install the CUDA build that fits its
    # driver first (README).
    pip install --quiet --disable-pip-version-check torch==2.13.0
    pip install --quiet --disable-pip-version-check -e ".[$1]"
}
