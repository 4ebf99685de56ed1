#!/usr/bin/env bash
# A throw-away PostgreSQL 15 cluster for the tests: loopback only, trust authentication, its data
# directory in a temporary folder that `stop` deletes.
#
#   eval "$(.ci/postgres.sh start)"   # starts it; prints `export ATLAS_PG_PORT=... ATLAS_TEST_PG_URL=...`
#   .ci/postgres.sh stop              # stops the one this shell started ($ATLAS_PG_STARTED; else the one
#                                     # recorded for $ATLAS_PG_PORT) and removes its data directory
#   .ci/postgres.sh restart           # restarts that one (`pg_ctl restart -m fast`: every connection is
#                                     # dropped; tests/store/test_pg_restart.py does it mid-run)
#
# Environment: ATLAS_PG_PORT (default: the first free port from 55432), ATLAS_PG_BIN (default: the
# newest /usr/lib/postgresql/*/bin), ATLAS_PG_DIR (the data folder; default a new mktemp folder,
# remembered in /tmp/atlas-pg-<port>.dir). As root the server runs as the `postgres` OS user
# (PostgreSQL refuses to run as root). The database user is `atlas`, trusted on loopback only.
set -euo pipefail

free_port() {  # the first port from $1 nothing listens on
    python3 - "$1" <<'PY'
import socket, sys
p = int(sys.argv[1])
while True:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
            break
        except OSError:
            p += 1
print(p)
PY
}

if [ -n "${ATLAS_PG_PORT:-}" ]; then PORT="$ATLAS_PG_PORT"
elif [ "${1:-}" = start ]; then PORT="$(free_port 55432)"
else PORT=55432
fi
BIN="${ATLAS_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}"
STATE="/tmp/atlas-pg-${PORT}.dir"

as_owner() {  # run a server command as the data directory's owner (never as root)
    if [ "$(id -u)" = 0 ]; then
        (cd / && su postgres -s /bin/sh -c "$(printf '%q ' "$@")")  # from /: the checkout may be closed to postgres
    else
        "$@"
    fi
}

case "${1:-}" in
start)
    [ -x "$BIN/initdb" ] || { echo "no PostgreSQL binaries in '$BIN' (set ATLAS_PG_BIN)" >&2; exit 1; }
    if [ -f "$STATE" ]; then
        OLD="$(cat "$STATE")"
        if [ -d "$OLD/data" ] && as_owner "$BIN/pg_ctl" -D "$OLD/data" status >/dev/null 2>&1; then
            echo "a cluster on port $PORT is already recorded in $STATE; run '$0 stop' first" >&2
            exit 1
        fi
        rm -rf "$OLD" "$STATE"  # its server is gone (killed without `stop`, a reboot): the record is stale
    fi
    DIR="${ATLAS_PG_DIR:-$(mktemp -d /tmp/atlas-pg.XXXXXX)}"
    mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
    chmod 700 "$DIR"
    echo "$DIR" > "$STATE"
    as_owner "$BIN/initdb" -D "$DIR/data" -U atlas --auth=trust -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; rm -rf "$DIR" "$STATE"; exit 1; }
    # loopback only, the socket inside the data folder; fsync off: a throw-away cluster needs no durability
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        >/dev/null || { cat "$DIR/server.log" >&2; rm -rf "$DIR" "$STATE"; exit 1; }
    echo "export ATLAS_PG_PORT=$PORT ATLAS_PG_STARTED=$DIR ATLAS_TEST_PG_URL=postgresql+psycopg://atlas@127.0.0.1:$PORT/postgres"
    ;;
restart)
    # the cluster this shell started, or the one recorded for the port; with the options it started with
    DIR="${ATLAS_PG_STARTED:-$(cat "$STATE" 2>/dev/null || true)}"
    [ -d "$DIR/data" ] || { echo "no cluster of this shell or recorded for port $PORT to restart" >&2; exit 1; }
    as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -m fast -w -t 60 restart >/dev/null \
        || { tail -20 "$DIR/server.log" >&2; exit 1; }
    ;;
stop)
    # the cluster this shell started (start exported its folder), never another run's that took the
    # same port after it; without it, the one recorded for the port
    if [ -n "${ATLAS_PG_STARTED:-}" ]; then
        DIR="$ATLAS_PG_STARTED"
        [ "$(cat "$STATE" 2>/dev/null)" = "$DIR" ] || STATE=/dev/null
    else
        [ -f "$STATE" ] || exit 0
        DIR="$(cat "$STATE")"
    fi
    if [ -d "$DIR/data" ]; then
        as_owner "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
    [ "$STATE" = /dev/null ] || rm -f "$STATE"
    ;;
*)
    echo "usage: $0 start|stop|restart" >&2
    exit 2
    ;;
esac
