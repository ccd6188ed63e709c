# shellcheck shell=bash
# Shared settings and helpers for the ops/ scripts. Sourced, never executed.
#
# Everything is resolved from this file's location, so the scripts work from any
# cwd and from a fresh clone anywhere.

OPS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$OPS_DIR/.." && pwd)"
TEMPLATES_DIR="$OPS_DIR/templates"
LOCAL_DIR="$REPO_ROOT/.local"

# Downloaded artifacts (Kafka jars, Maven repo) live outside the repo.
METER_CACHE="${METER_CACHE:-${HOME:-/root}/.cache/meterline}"

# ---- Kafka ---------------------------------------------------------------
# The single place where the Kafka version is pinned (org.apache.kafka:kafka_2.13).
KAFKA_VERSION="4.4.0"
KAFKA_HOME="$METER_CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_DIR="$LOCAL_DIR/kafka"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"

# ---- ClickHouse ----------------------------------------------------------
CH_DIR="$LOCAL_DIR/clickhouse"
CLICKHOUSE_HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-8123}"
CLICKHOUSE_TCP_PORT="${CLICKHOUSE_TCP_PORT:-9000}"
CLICKHOUSE_START_TIMEOUT="${CLICKHOUSE_START_TIMEOUT:-60}"
METER_ANALYST_PASSWORD="${METER_ANALYST_PASSWORD:-}"

# ---- helpers -------------------------------------------------------------
log() { printf '[%s] %s\n' "${LOG_TAG:-ops}" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "${LOG_TAG:-ops}" "$*" >&2; exit 1; }

# pid_alive PIDFILE -> 0 if the pid in PIDFILE is a live (non-zombie) process
pid_alive() {
    local pidfile="$1" pid state
    [[ -s "$pidfile" ]] || return 1
    pid="$(cat "$pidfile" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(ps -o stat= -p "$pid" 2>/dev/null | tr -d ' ')" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# port_open PORT -> 0 if something accepts TCP connections on 127.0.0.1:PORT
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_bg PIDFILE OUTFILE CMD... : start CMD in its own session, detached from
# the caller's terminal / process group, and record its pid.
start_bg() {
    local pidfile="$1" outfile="$2"
    shift 2
    rm -f "$pidfile"
    # the inner shell writes its own pid and then execs the command, so the
    # pidfile holds the server's pid (not a wrapper's).
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        </dev/null >>"$outfile" 2>&1 &
    local i
    for i in $(seq 1 50); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.1
    done
    die "process did not start: $*"
}

# stop_pid PIDFILE NAME [TIMEOUT]: SIGTERM, wait, then SIGKILL.
stop_pid() {
    local pidfile="$1" name="$2" timeout="${3:-60}" pid i
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        log "$name: not running"
        return 0
    fi
    pid="$(cat "$pidfile")"
    log "$name: stopping (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        pid_alive "$pidfile" || break
        sleep 0.1
    done
    if pid_alive "$pidfile"; then
        log "$name: still running after ${timeout}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            pid_alive "$pidfile" || break
            sleep 0.1
        done
    fi
    pid_alive "$pidfile" && die "$name: could not stop pid $pid"
    rm -f "$pidfile"
    log "$name: stopped"
}

# render TEMPLATE OUT VAR... : copy TEMPLATE to OUT replacing @VAR@ with $VAR.
render() {
    local tpl="$1" out="$2" content var
    shift 2
    content="$(cat "$tpl")"
    for var in "$@"; do
        content="${content//@${var}@/${!var}}"
    done
    printf '%s\n' "$content" >"$out.tmp"
    mv -f "$out.tmp" "$out"
}

# show_log_tail FILE... : last 40 lines of each existing file, to stderr.
show_log_tail() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        printf -- '----- last 40 lines of %s -----\n' "$f" >&2
        tail -n 40 "$f" >&2
    done
}

kafka_installed() {
    [[ -f "$KAFKA_HOME/.complete" ]] && compgen -G "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null
}

# clickhouse_server_cmd: prints the server launcher (Debian: clickhouse-server;
# upstream packages: `clickhouse server`).
clickhouse_server_cmd() {
    if command -v clickhouse-server >/dev/null 2>&1; then
        command -v clickhouse-server
    elif [[ -x /usr/sbin/clickhouse-server ]]; then
        echo /usr/sbin/clickhouse-server
    elif command -v clickhouse >/dev/null 2>&1; then
        echo "$(command -v clickhouse) server"
    else
        return 1
    fi
}
