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
CLICKHOUSE_HTTPS_PORT="${CLICKHOUSE_HTTPS_PORT:-8443}"
CLICKHOUSE_HTTPS_URL="https://127.0.0.1:$CLICKHOUSE_HTTPS_PORT"

# ---- secure stack (#15) --------------------------------------------------
# Dev PKI and per-service secrets (ensure_secure_material), shared by
# ops/clickhouse (HTTPS, users writer/analyst) and ops/secure (SASL_SSL broker).
SECURE_DIR="$LOCAL_DIR/secure"
SECURE_PKI="$SECURE_DIR/pki"
SECURE_SECRETS="$SECURE_DIR/secrets"
KAFKA_SECURE_DIR="$LOCAL_DIR/kafka-secure"
KAFKA_SECURE_PORT="${KAFKA_SECURE_PORT:-9094}"
KAFKA_SECURE_CONTROLLER_PORT="${KAFKA_SECURE_CONTROLLER_PORT:-9095}"
KAFKA_SECURE_BOOTSTRAP="127.0.0.1:$KAFKA_SECURE_PORT"
# SCRAM principals of the secure broker (secrets/kafka-<name>.password).
# One added here is created on the next `ops/secure start`, also on a broker
# formatted without it (ensure_scram_users).
KAFKA_SECURE_USERS=(admin agent processor sink billing rating serve)
# secrets that are digits only: "a numeric-looking secret stays a string"
SECURE_NUMERIC_SECRETS=(kafka-sink clickhouse-writer)

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

# ---- secure material -----------------------------------------------------
# ensure_secure_material: create what is missing under $SECURE_DIR (keeps what
# exists): a dev CA (EC P-256) and leaf certs signed by it, an unrelated CA
# (other-ca.pem, the "untrusted CA" of tests), and one random secret per
# principal. Keys are unencrypted PKCS#8 PEM, keys and secrets mode 0600.
# Never prints a secret. Serialised with flock (ops/clickhouse and ops/secure
# may run at the same time).
ensure_secure_material() {
    mkdir -p "$SECURE_DIR"
    (
        umask 077
        exec 9>"$SECURE_DIR/.lock"
        flock 9
        mkdir -p "$SECURE_PKI" "$SECURE_SECRETS"
        chmod 755 "$SECURE_PKI"
        chmod 700 "$SECURE_SECRETS"
        _secure_pki
        _secure_secrets
    )
}

# _ssl_run CMD... : run openssl quietly; its output only on failure
_ssl_run() {
    local out
    out="$("$@" 2>&1)" || { printf '%s\n' "$out" >&2; die "failed: $*"; }
}

# _ssl_ca NAME CN : self-signed CA NAME.pem + NAME.key (10 years)
_ssl_ca() {
    local name="$1" cn="$2"
    _ssl_run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$SECURE_PKI/$name.key.tmp"
    _ssl_run openssl req -x509 -new -key "$SECURE_PKI/$name.key.tmp" -out "$SECURE_PKI/$name.pem.tmp" \
        -days 3650 -sha256 -subj "/O=meterline dev/CN=$cn" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    mv -f "$SECURE_PKI/$name.key.tmp" "$SECURE_PKI/$name.key"
    mv -f "$SECURE_PKI/$name.pem.tmp" "$SECURE_PKI/$name.pem"
}

# _ssl_leaf NAME CN EKU [SAN] : NAME.pem + NAME.key signed by ca.pem (825 days)
_ssl_leaf() {
    local name="$1" cn="$2" eku="$3" san="${4:-}"
    local ext="$SECURE_PKI/$name.ext"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$eku"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
        [[ -z "$san" ]] || echo "subjectAltName=$san"
    } >"$ext"
    _ssl_run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$SECURE_PKI/$name.key.tmp"
    _ssl_run openssl req -new -key "$SECURE_PKI/$name.key.tmp" -subj "/CN=$cn" -out "$SECURE_PKI/$name.csr"
    _ssl_run openssl x509 -req -in "$SECURE_PKI/$name.csr" -CA "$SECURE_PKI/ca.pem" -CAkey "$SECURE_PKI/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 -extfile "$ext" -out "$SECURE_PKI/$name.pem.tmp"
    rm -f "$SECURE_PKI/$name.csr" "$ext"
    mv -f "$SECURE_PKI/$name.key.tmp" "$SECURE_PKI/$name.key"
    mv -f "$SECURE_PKI/$name.pem.tmp" "$SECURE_PKI/$name.pem"
}

# _ssl_leaf_ok NAME : NAME.pem and NAME.key exist, chain to ca.pem, valid for another day
_ssl_leaf_ok() {
    local pem="$SECURE_PKI/$1.pem"
    [[ -s "$pem" && -s "$SECURE_PKI/$1.key" ]] || return 1
    openssl verify -CAfile "$SECURE_PKI/ca.pem" "$pem" >/dev/null 2>&1 || return 1
    openssl x509 -in "$pem" -noout -checkend 86400 >/dev/null 2>&1
}

_secure_pki() {
    local san="DNS:localhost,IP:127.0.0.1"
    if [[ ! -s "$SECURE_PKI/ca.pem" || ! -s "$SECURE_PKI/ca.key" ]]; then
        log "generating the dev CA in $SECURE_PKI"
        _ssl_ca ca "meterline dev CA"
    fi
    if [[ ! -s "$SECURE_PKI/other-ca.pem" ]]; then
        _ssl_ca other-ca "meterline untrusted CA"
    fi
    # broker: also a TLS client of its own controller listener (mutual TLS,
    # principal User:CN=broker)
    _ssl_leaf_ok broker || { log "issuing pki/broker.pem"; _ssl_leaf broker broker serverAuth,clientAuth "$san"; }
    _ssl_leaf_ok clickhouse || { log "issuing pki/clickhouse.pem"; _ssl_leaf clickhouse clickhouse serverAuth "$san"; }
    _ssl_leaf_ok client || { log "issuing pki/client.pem"; _ssl_leaf client meter-client clientAuth; }
    chmod 600 "$SECURE_PKI"/*.key
    chmod 644 "$SECURE_PKI"/*.pem
}

# _secret_digits N : N random decimal digits
_secret_digits() {
    local d=""
    while ((${#d} < $1)); do
        d+="$(openssl rand -hex 32 | tr -dc 0-9)"
    done
    printf '%s' "${d:0:$1}"
}

_secure_secrets() {
    local name f created=()
    for name in "${KAFKA_SECURE_USERS[@]/#/kafka-}" clickhouse-writer clickhouse-analyst; do
        f="$SECURE_SECRETS/$name.password"
        [[ -s "$f" ]] && continue
        if [[ " ${SECURE_NUMERIC_SECRETS[*]} " == *" $name "* ]]; then
            _secret_digits 20 >"$f.tmp"
        else
            openssl rand -hex 16 | tr -d '\n' >"$f.tmp"
        fi
        mv -f "$f.tmp" "$f"
        created+=("$name")
    done
    chmod 600 "$SECURE_SECRETS"/*.password
    ((${#created[@]} == 0)) || log "generated secrets in $SECURE_SECRETS: ${created[*]}"
}

# secret NAME : the secret secrets/NAME.password (e.g. kafka-agent), no newline
secret() {
    local f="$SECURE_SECRETS/$1.password"
    [[ -s "$f" ]] || die "missing secret $f (ops/secure start creates it)"
    tr -d '\r\n' <"$f"
}

# sha256_hex : hex SHA-256 of stdin
sha256_hex() { sha256sum | cut -d' ' -f1; }

# ---- local cluster (#16) -------------------------------------------------
# ops/cluster: 3 KRaft brokers (each broker+controller), a standalone
# ZooKeeper, ClickHouse 2 shards x 2 replicas, all on loopback.
CLUSTER_DIR="$LOCAL_DIR/cluster"
CLUSTER_NAME="meterline"   # remote_servers name and {cluster} macro
# The single place where the ZooKeeper version is pinned (org.apache.zookeeper:zookeeper).
ZOOKEEPER_VERSION="3.9.5"
ZOOKEEPER_HOME="$METER_CACHE/zookeeper-$ZOOKEEPER_VERSION"
ZOOKEEPER_LIBS="$ZOOKEEPER_HOME/libs"
CLUSTER_ZK_PORT="${CLUSTER_ZK_PORT:-12181}"
CLUSTER_ZK_HEAP_OPTS="${CLUSTER_ZK_HEAP_OPTS:--Xms32m -Xmx256m}"
# broker N (1..3): client port BASE+N-1, controller port CONTROLLER_BASE+N-1
CLUSTER_KAFKA_PORT_BASE="${CLUSTER_KAFKA_PORT_BASE:-19092}"
CLUSTER_KAFKA_CONTROLLER_PORT_BASE="${CLUSTER_KAFKA_CONTROLLER_PORT_BASE:-19192}"
CLUSTER_KAFKA_HEAP_OPTS="${CLUSTER_KAFKA_HEAP_OPTS:--Xms192m -Xmx384m}"
CLUSTER_KAFKA_NODES=(1 2 3)
# ClickHouse shard S, replica R (1..2): i = (S-1)*2 + (R-1); ports BASE+i
CLUSTER_CH_HTTP_PORT_BASE="${CLUSTER_CH_HTTP_PORT_BASE:-18123}"
CLUSTER_CH_TCP_PORT_BASE="${CLUSTER_CH_TCP_PORT_BASE:-19000}"
CLUSTER_CH_INTERSERVER_PORT_BASE="${CLUSTER_CH_INTERSERVER_PORT_BASE:-19009}"
CLUSTER_CH_REPLICAS=("1 1" "1 2" "2 1" "2 2")
CLUSTER_START_TIMEOUT="${CLUSTER_START_TIMEOUT:-120}"

# cluster_kafka_port N / cluster_kafka_controller_port N
cluster_kafka_port() { echo $((CLUSTER_KAFKA_PORT_BASE + $1 - 1)); }
cluster_kafka_controller_port() { echo $((CLUSTER_KAFKA_CONTROLLER_PORT_BASE + $1 - 1)); }
# cluster_kafka_bootstrap: 127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094
cluster_kafka_bootstrap() {
    local n out=()
    for n in "${CLUSTER_KAFKA_NODES[@]}"; do out+=("127.0.0.1:$(cluster_kafka_port "$n")"); done
    (IFS=,; echo "${out[*]}")
}
# cluster_ch_index S R -> 0..3; cluster_ch_{http,tcp,interserver}_port S R
cluster_ch_index() { echo $((($1 - 1) * 2 + $2 - 1)); }
cluster_ch_http_port() { echo $((CLUSTER_CH_HTTP_PORT_BASE + $(cluster_ch_index "$1" "$2"))); }
cluster_ch_tcp_port() { echo $((CLUSTER_CH_TCP_PORT_BASE + $(cluster_ch_index "$1" "$2"))); }
cluster_ch_interserver_port() { echo $((CLUSTER_CH_INTERSERVER_PORT_BASE + $(cluster_ch_index "$1" "$2"))); }
# cluster_clickhouse_urls: http://127.0.0.1:18123,...,http://127.0.0.1:18126
cluster_clickhouse_urls() {
    local sr out=()
    for sr in "${CLUSTER_CH_REPLICAS[@]}"; do
        # shellcheck disable=SC2086  # "S R"
        out+=("http://127.0.0.1:$(cluster_ch_http_port $sr)")
    done
    (IFS=,; echo "${out[*]}")
}

zookeeper_installed() {
    [[ -f "$ZOOKEEPER_HOME/.complete" ]] && compgen -G "$ZOOKEEPER_LIBS/zookeeper-$ZOOKEEPER_VERSION.jar" >/dev/null
}
