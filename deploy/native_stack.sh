#!/usr/bin/env bash
# The production stack of docker-compose.yml, run natively on 127.0.0.1 (for machines without Docker, e.g. CI):
#   PostgreSQL (Debian package) with databases "prefect" and "mlflow"
#   mlflow server   backed by postgres, --serve-artifacts to a local folder, --allowed-hosts set
#   prefect server  backed by postgres (API + UI + services)
#   a process work pool "linewatch-process" and one worker
#
# Usage: deploy/native_stack.sh start|stop|status|env
#   start   start everything (idempotent: a running stack is left as is), wait for health, write $STACK_DIR/stack.env
#   stop    stop everything this script started (by recorded pid), keep the data
#   status  print what runs; exit 0 when all four services are healthy
#   env     print the stack.env file (source it: `eval "$(deploy/native_stack.sh env)"`)
#   purge   stop and delete $STACK_DIR
#
# Environment (all optional):
#   LINEWATCH_STACK_DIR   state folder (default /tmp/linewatch-stack)
#   LINEWATCH_VENV        python venv with linewatch installed (default <repo>/.venv)
#   STACK_PG_PORT / STACK_MLFLOW_PORT / STACK_PREFECT_PORT   (default 55432 / 55000 / 54200)
#   STACK_WORK_POOL       (default linewatch-process)
# Needs: postgresql from Debian packages (`apt-get install -y postgresql`), psycopg2-binary in the venv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${LINEWATCH_STACK_DIR:-/tmp/linewatch-stack}"
VENV="${LINEWATCH_VENV:-$REPO/.venv}"
PG_PORT="${STACK_PG_PORT:-55432}"
MLFLOW_PORT="${STACK_MLFLOW_PORT:-55000}"
PREFECT_PORT="${STACK_PREFECT_PORT:-54200}"
POOL="${STACK_WORK_POOL:-linewatch-process}"
HOST=127.0.0.1
PGDATA="$STACK_DIR/pgdata"
PGSOCK="$STACK_DIR/pgsock"
LOGS="$STACK_DIR/logs"
PG_USER=linewatch            # trust auth on 127.0.0.1 only: a throw-away test cluster, no password
MLFLOW_DB_URL="postgresql+psycopg2://$PG_USER@$HOST:$PG_PORT/mlflow"
PREFECT_DB_URL="postgresql+asyncpg://$PG_USER@$HOST:$PG_PORT/prefect"
MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
PREFECT_API_URL="http://$HOST:$PREFECT_PORT/api"

log() { printf '[native_stack %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pg_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$d/pg_ctl" && -x "$d/initdb" ]] && { echo "$d"; return 0; }
  done
  command -v pg_ctl >/dev/null && { dirname "$(readlink -f "$(command -v pg_ctl)")"; return 0; }
  return 1
}

# Run a postgres binary as the postgres user when we are root (postgres refuses to run as root).
as_pg() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

alive() { [[ -f "$STACK_DIR/$1.pid" ]] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null; }

wait_http() {  # url, name, seconds   (name = the pid file of the process serving it)
  local url=$1 name=$2 secs=${3:-120} i
  for ((i = 0; i < secs; i++)); do
    alive "$name" || die "$name exited during start-up; see $LOGS/$name.log"
    if "$VENV/bin/python" - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    sleep 1
  done
  die "$name not healthy at $url after ${secs}s; see $LOGS/$name.log"
}

start_pg() {
  local bin; bin="$(pg_bin)" || die "PostgreSQL not found: apt-get install -y postgresql"
  mkdir -p "$STACK_DIR" "$PGSOCK" "$LOGS"
  if [[ $(id -u) -eq 0 ]]; then chown postgres "$PGSOCK" "$LOGS"; chmod 777 "$LOGS"; fi
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    log "initdb $PGDATA ($bin)"
    mkdir -p "$PGDATA"; [[ $(id -u) -eq 0 ]] && chown postgres "$PGDATA"
    as_pg "$bin/initdb" -D "$PGDATA" -U "$PG_USER" --auth=trust -E UTF8 --locale=C.UTF-8 >"$LOGS/initdb.log" 2>&1 \
      || as_pg "$bin/initdb" -D "$PGDATA" -U "$PG_USER" --auth=trust -E UTF8 >"$LOGS/initdb.log" 2>&1 \
      || die "initdb failed; see $LOGS/initdb.log"
  fi
  if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "postgres already running"
  else
    log "starting postgres on $HOST:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$LOGS/postgres.log" -w -t 60 \
      -o "-p $PG_PORT -k $PGSOCK -c listen_addresses=$HOST -c max_connections=200 -c fsync=off" start >/dev/null \
      || die "postgres did not start; see $LOGS/postgres.log"
  fi
  "$bin/pg_isready" -h "$HOST" -p "$PG_PORT" -t 30 >/dev/null || die "pg_isready failed"
  local db
  for db in prefect mlflow; do
    if ! "$bin/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='$db'" 2>/dev/null | grep -q 1; then
      "$bin/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -qc "CREATE DATABASE $db" \
        || die "could not create database $db"
    fi
  done
  "$bin/psql" -h "$HOST" -p "$PG_PORT" -U "$PG_USER" -d prefect -qc "CREATE EXTENSION IF NOT EXISTS pg_trgm" \
    >/dev/null 2>&1 || log "pg_trgm not available (postgresql-contrib); prefect works but slower search"
}

wait_port_free() {  # port, name, seconds: a server of an earlier run may still be shutting down
  local port=$1 name=$2 secs=${3:-30} i
  alive "$name" && return 0
  for ((i = 0; i < secs; i++)); do
    (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null || return 0
    sleep 1
  done
  die "port $port for $name is still in use after ${secs} s: $(ss -ltnp 2>/dev/null | grep ":$port " || true)"
}

spawn() {  # name, command...   (own session, so stop can kill the whole group)
  local name=$1; shift
  if alive "$name"; then log "$name already running (pid $(cat "$STACK_DIR/$name.pid"))"; return 0; fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK_DIR/$name.pid"
  log "$name started (pid $!)"
}

start() {
  [[ -x "$VENV/bin/python" ]] || die "no venv at $VENV (set LINEWATCH_VENV)"
  "$VENV/bin/python" -c "import psycopg2" 2>/dev/null || die "psycopg2 missing: $VENV/bin/pip install psycopg2-binary"
  local t0=$SECONDS
  start_pg
  mkdir -p "$STACK_DIR/artifacts" "$STACK_DIR/prefect-home"
  wait_port_free "$MLFLOW_PORT" mlflow
  wait_port_free "$PREFECT_PORT" prefect-server
  spawn mlflow env MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 \
    "$VENV/bin/mlflow" server \
      --backend-store-uri "$MLFLOW_DB_URL" \
      --serve-artifacts --artifacts-destination "$STACK_DIR/artifacts" \
      --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
      --allowed-hosts "$HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT,$HOST,localhost"
  spawn prefect-server env PREFECT_HOME="$STACK_DIR/prefect-home" \
    PREFECT_SERVER_DATABASE_CONNECTION_URL="$PREFECT_DB_URL" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_API_URL="$PREFECT_API_URL" \
    "$VENV/bin/prefect" server start --host "$HOST" --port "$PREFECT_PORT"
  wait_http "$PREFECT_API_URL/health" prefect-server 180
  PREFECT_HOME="$STACK_DIR/prefect-home" PREFECT_API_URL="$PREFECT_API_URL" \
    "$VENV/bin/prefect" work-pool create "$POOL" --type process >"$LOGS/work-pool.log" 2>&1 \
    || grep -qi "already exists" "$LOGS/work-pool.log" || die "work pool: see $LOGS/work-pool.log"
  mkdir -p "$STACK_DIR/linewatch-home"
  spawn prefect-worker env PREFECT_HOME="$STACK_DIR/prefect-home" PREFECT_API_URL="$PREFECT_API_URL" \
    PREFECT_WORKER_QUERY_SECONDS=5 MLFLOW_TRACKING_URI="$MLFLOW_URL" PYTHONPATH="$REPO" \
    LINEWATCH_HOME="${LINEWATCH_HOME:-$STACK_DIR/linewatch-home}" LINEWATCH_WORK_POOL="$POOL" \
    LINEWATCH_TIMEZONE="${LINEWATCH_TIMEZONE:-UTC}" LINEWATCH_WEBHOOK_URL="${LINEWATCH_WEBHOOK_URL:-}" \
    "$VENV/bin/prefect" worker start --pool "$POOL" --type process --name native-worker
  wait_http "$MLFLOW_URL/health" mlflow 180
  cat >"$STACK_DIR/stack.env" <<EOF
MLFLOW_TRACKING_URI=$MLFLOW_URL
PREFECT_API_URL=$PREFECT_API_URL
LINEWATCH_WORK_POOL=$POOL
LINEWATCH_STACK_DIR=$STACK_DIR
LINEWATCH_STACK_PG=postgresql://$PG_USER@$HOST:$PG_PORT
EOF
  log "stack up in $((SECONDS - t0)) s: mlflow $MLFLOW_URL, prefect $PREFECT_API_URL (env: $STACK_DIR/stack.env)"
}

stop_one() {
  local name=$1 pid i
  [[ -f "$STACK_DIR/$name.pid" ]] || return 0
  pid=$(cat "$STACK_DIR/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "$name stopped"
  fi
  rm -f "$STACK_DIR/$name.pid"
}

stop() {
  stop_one prefect-worker
  stop_one prefect-server
  stop_one mlflow
  local bin
  if bin="$(pg_bin)" && [[ -f "$PGDATA/PG_VERSION" ]]; then
    as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 && log "postgres stopped" || true
  fi
  rm -f "$STACK_DIR/stack.env"
}

status() {
  local ok=0 name bin
  bin="$(pg_bin)" || true
  if [[ -n "${bin:-}" ]] && "$bin/pg_isready" -h "$HOST" -p "$PG_PORT" -t 2 >/dev/null 2>&1; then
    echo "postgres       up   $HOST:$PG_PORT"; else echo "postgres       DOWN"; ok=1; fi
  for name in mlflow prefect-server prefect-worker; do
    if alive "$name"; then printf '%-14s up   pid %s\n' "$name" "$(cat "$STACK_DIR/$name.pid")"
    else printf '%-14s DOWN\n' "$name"; ok=1; fi
  done
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) [[ -f "$STACK_DIR/stack.env" ]] && sed 's/^/export /' "$STACK_DIR/stack.env" || die "stack not started" ;;
  purge) stop; rm -rf "$STACK_DIR"; log "removed $STACK_DIR" ;;
  *) echo "usage: $0 start|stop|status|env|purge" >&2; exit 2 ;;
esac
