# Sourced by bench/run and bench/soak: the Debian packages they need and the
# project's .venv. Expects $here (this directory).
root=$(dirname "$here")

# need_packages command:package ... -- installs the packages whose command is missing.
need_packages() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: missing Debian package(s) ${missing[*]}; install them and rerun" >&2
    exit 2
  fi
  echo "bench: installing ${missing[*]} (apt-get install -y)" >&2
  export DEBIAN_FRONTEND=noninteractive
  local log
  log=$(mktemp)
  if ! { apt-get install -y -q --no-install-recommends "${missing[@]}" \
         || { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }; } \
       >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    rm -f "$log"
    echo "bench: could not install ${missing[*]}" >&2
    exit 2
  fi
  rm -f "$log"
}

# The project's .venv, made by the Makefile's own target when it is missing
# or cannot run twistd apigw. APIGW_VENV=DIR uses that virtualenv instead
# (e.g. another checkout's, from a git worktree): the bench puts this
# checkout first on the gateways' PYTHONPATH, so its own apigw still runs.
ensure_venv() {
  if [ -n "${APIGW_VENV:-}" ]; then
    VENV_PY=$APIGW_VENV/bin/python
    if [ -x "$VENV_PY" ] && [ -x "$APIGW_VENV/bin/twistd" ]; then
      return 0
    fi
    echo "bench: APIGW_VENV=$APIGW_VENV has no bin/python and bin/twistd" >&2
    exit 2
  fi
  VENV_PY=$root/.venv/bin/python
  if [ -x "$VENV_PY" ] && [ -x "$root/.venv/bin/twistd" ] \
     && "$VENV_PY" -c 'import apigw.tap' >/dev/null 2>&1; then
    return 0
  fi
  echo "bench: preparing $root/.venv (make .venv/.installed-demo)" >&2
  make -C "$root" -s .venv/.installed-demo
}
