# Helpers shared by the server scripts (scripts/brokers, tls-brokers, rabbit-cluster, stores).
# Source it after setting LOG_TAG (the prefix of every log line, e.g. `brokers`).

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (install it by hand, or run as root)"; fi
}

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
# The first line of a pid file (PostgreSQL's postmaster.pid holds more after it).
pid_of() { head -n1 "$1" 2>/dev/null || true; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
rss_mib() { awk '/VmRSS/ {printf "%d", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }

# wait_for DESCRIPTION TIMEOUT COMMAND...: run COMMAND until it succeeds, or die after TIMEOUT s.
wait_for() {
  local what=$1 timeout=$2 start=$SECONDS
  shift 2
  until "$@"; do
    ((SECONDS - start < timeout)) || die "timed out after ${timeout}s waiting for $what"
    sleep "${WAIT_FOR_POLL:-0.5}"
  done
}
