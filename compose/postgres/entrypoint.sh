#!/usr/bin/env bash
# Entrypoint of the pglb PostgreSQL image (15, 17 or 18: PG_MAJOR): one image for every node of a
# primary/replica cluster.
#
# What it does, depending on what it finds:
#   * empty data dir, a peer is already a primary       -> clone it (pg_basebackup), start as standby
#   * empty data dir, this node is the initial primary  -> initdb, settings, roles, start as primary
#   * empty data dir, otherwise                         -> wait for a primary (deadline), clone, standby
#   * existing data dir, a peer is a primary on a newer timeline than this node
#                                                       -> pg_rewind from it, come back as its standby
#                                                          (pg_rewind fails: keep the old data dir
#                                                          aside and clone afresh, logged loudly)
#   * existing data dir, standby                        -> follow the current primary if one answers
#   * otherwise                                         -> just start
# and then runs postgres in the foreground as the postgres user (exec: PID 1, so `docker stop`
# gives a clean shutdown; the image's STOPSIGNAL is SIGINT = fast shutdown).
#
# Environment (compose/.env.example has the credentials, compose/compose.yaml the topology):
#   PGLB_NODE_NAME             this node's name = its host name for the peers (e.g. pg-1). Required.
#   PRIMARY_HOST               the initial primary, host[:port] (e.g. pg-0). Required.
#   PGLB_PEERS                 all nodes, "pg-0:5432,pg-1:5432,..." (this node may be listed too)
#   POSTGRES_PASSWORD          password of the superuser "postgres". Required.
#   PGLB_REPLICATION_PASSWORD  password of the replication role. Required.
#   PGLB_CHECK_PASSWORD        password of pglb's health-check role. Required.
#   PGLB_PROMOTER_PASSWORD     password of the promoter's role; unset = no promoter role
#   APP_USER, APP_PASSWORD, APP_DB   an application role and its database (APP_DB defaults to APP_USER)
#   PGLB_REPLICATION_USER (replicator)  PGLB_CHECK_USER (pglb_check)  PGLB_PROMOTER_USER (pglb_promoter)
#   PGLB_WAIT_PRIMARY_TIMEOUT  seconds a new replica waits for a primary before giving up (300)
#   PGLB_PEER_WAIT             seconds a restarting primary waits for silent peers before it
#                              concludes that no newer primary exists (15)
# Roles and passwords follow the environment at every start: the node that starts as the primary
# creates missing roles and sets every password from the variables above (on a temporary server
# listening on the Unix socket only, before any client can connect); the standbys get them through
# replication. Each node rewrites its passfile (replication, pg_basebackup, pg_rewind) at every
# start, and a standby's primary_conninfo is made to read it. So: change a password in .env, run
# compose/up, and the stack uses the new one. Passwords never appear on a command line.
#
# Files: PGDATA=/var/lib/postgresql/data/pgdata (a subdirectory of the volume, so that a broken
# data dir can be moved aside). conf.d/00-pglb.conf and pg_hba.conf are rewritten at every start;
# put your own settings in postgresql.auto.conf (ALTER SYSTEM).
# Node-specific settings (listen_addresses, port, cluster_name) are given to postgres on its
# command line (-c), never in a file inside PGDATA: pg_rewind copies postgresql.conf,
# postgresql.auto.conf and conf.d/ from the primary it rewinds from, and the command line outranks
# every file, so a rewound node still starts as itself (docs/failover.md, "Rejoin").
set -Eeuo pipefail
shopt -s nullglob

PG_MAJOR="${PG_MAJOR:-15}"
export PATH="/usr/lib/postgresql/$PG_MAJOR/bin:$PATH"
export PGDATA="${PGDATA:-/var/lib/postgresql/data/pgdata}"
export LC_ALL=C.UTF-8
VOLUME_DIR="$(dirname "$PGDATA")"
PGHOME=/var/lib/postgresql
PASSFILE="$PGHOME/.pgpass"
SOCKET_DIR=/var/run/postgresql
PORT=5432   # the peers (PGLB_PEERS), pglb's lb.toml and the health checks all say 5432

NODE="${PGLB_NODE_NAME:-}"
REPL_USER="${PGLB_REPLICATION_USER:-replicator}"
CHECK_USER="${PGLB_CHECK_USER:-pglb_check}"
PROMOTER_USER="${PGLB_PROMOTER_USER:-pglb_promoter}"
WAIT_PRIMARY="${PGLB_WAIT_PRIMARY_TIMEOUT:-300}"
PEER_WAIT="${PGLB_PEER_WAIT:-15}"
TEMP_SERVER=0
INITIALISED=0

log() { printf '%s pglb-entrypoint[%s]: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${NODE:-?}" "$*" >&2; }
loud() {
    log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    local l; for l in "$@"; do log "!!! $l"; done
    log "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
}
die() { log "FATAL: $*"; exit 1; }

on_signal() {
    log "signal received before PostgreSQL took over; stopping"
    if [ "$TEMP_SERVER" = 1 ]; then as_pg pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true; fi
    exit 143
}
trap on_signal TERM INT
trap 'log "error at line $LINENO: $BASH_COMMAND (exit $?)"' ERR

# Run a command as the postgres OS user (the entrypoint normally starts as root).
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups env HOME="$PGHOME" "$@"
    else
        "$@"
    fi
}

# The node's own settings, on the command line of every postgres this script starts (see the
# header: pg_rewind cannot overwrite them there).
node_options() {
    NODE_OPTS=(-c "listen_addresses=${1:-*}" -c "port=$PORT" -c "cluster_name=$NODE")
}

slot_name() { printf '%s' "$1" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9_]/_/g'; }

# ---------------------------------------------------------------------------------------------------
# environment and peers
[ -n "$NODE" ] || die "PGLB_NODE_NAME is not set (this node's name, e.g. pg-1)"
[ -n "${PRIMARY_HOST:-}" ] || die "PRIMARY_HOST is not set (the initial primary, e.g. pg-0)"
[ -n "${POSTGRES_PASSWORD:-}" ] || die "POSTGRES_PASSWORD is not set (see compose/.env.example)"
[ -n "${PGLB_REPLICATION_PASSWORD:-}" ] || die "PGLB_REPLICATION_PASSWORD is not set (see compose/.env.example)"
[ -n "${PGLB_CHECK_PASSWORD:-}" ] || die "PGLB_CHECK_PASSWORD is not set (see compose/.env.example)"
[[ "$NODE" =~ ^[A-Za-z0-9._-]+$ ]] || die "PGLB_NODE_NAME must be a host name, got '$NODE'"
SLOT="$(slot_name "$NODE")"

PRIMARY_NAME="${PRIMARY_HOST%%:*}"
IS_INITIAL_PRIMARY=0
[ "$PRIMARY_NAME" = "$NODE" ] && IS_INITIAL_PRIMARY=1

PEERS=()       # "host port", never this node
add_peer() {
    local h="${1%%:*}" p=5432 e
    [[ "$1" == *:* ]] && p="${1##*:}"
    [ -n "$h" ] && [ "$h" != "$NODE" ] || return 0
    [[ "$h" =~ ^[A-Za-z0-9._-]+$ && "$p" =~ ^[0-9]+$ ]] || die "bad peer '$1' in PGLB_PEERS/PRIMARY_HOST"
    for e in "${PEERS[@]}"; do [ "$e" = "$h $p" ] && return 0; done
    PEERS+=("$h $p")
}
IFS=', ' read -r -a _peer_list <<< "${PGLB_PEERS:-}"
for _p in "${_peer_list[@]}"; do add_peer "$_p"; done
add_peer "$PRIMARY_HOST"

# ---------------------------------------------------------------------------------------------------
# filesystem, password file
prepare_dirs() {
    if [ "$(id -u)" = 0 ]; then
        install -d -o postgres -g postgres -m 0700 "$VOLUME_DIR"
        chown postgres:postgres "$VOLUME_DIR"
        install -d -o postgres -g postgres -m 2775 "$SOCKET_DIR"
        [ -d "$PGDATA" ] && { chown -R postgres:postgres "$PGDATA"; chmod 0700 "$PGDATA"; }
    fi
    mkdir -p "$SOCKET_DIR" 2>/dev/null || true
}

pgpass_escape() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/:/\\:/g'; }
write_passfile() {
    # used by walreceiver (primary_conninfo passfile=...), pg_basebackup, pg_rewind, psql
    local tmp; tmp="$(mktemp)"
    {
        printf '*:*:*:%s:%s\n' postgres "$(pgpass_escape "$POSTGRES_PASSWORD")"
        printf '*:*:*:%s:%s\n' "$REPL_USER" "$(pgpass_escape "$PGLB_REPLICATION_PASSWORD")"
        if [ -n "${PGLB_PROMOTER_PASSWORD:-}" ] && [ "$PROMOTER_USER" != postgres ]; then
            printf '*:*:*:%s:%s\n' "$PROMOTER_USER" "$(pgpass_escape "$PGLB_PROMOTER_PASSWORD")"
        fi
    } > "$tmp"
    if [ "$(id -u)" = 0 ]; then
        install -o postgres -g postgres -m 0600 "$tmp" "$PASSFILE"
    else
        install -m 0600 "$tmp" "$PASSFILE"
    fi
    rm -f "$tmp"
}

# ---------------------------------------------------------------------------------------------------
# talking to peers (as the superuser; passwords come from $PASSFILE)
conninfo() { printf 'host=%s port=%s user=%s dbname=postgres connect_timeout=3 passfile=%s' "$1" "$2" "$3" "$PASSFILE"; }
peer_sql() {  # host port sql
    as_pg psql -XAtq -F ' ' -v ON_ERROR_STOP=1 "$(conninfo "$1" "$2" postgres)" -c "$3"
}

# Prints "<in_recovery t|f> <timeline> <system_identifier>"; fails when the peer does not answer.
# The timeline of a primary comes from its current WAL file name, which is right even just after a
# promotion (pg_control's timeline only moves at the next checkpoint).
probe() {
    as_pg pg_isready -q -h "$1" -p "$2" -t 3 >/dev/null 2>&1 || return 1
    peer_sql "$1" "$2" "select case when pg_is_in_recovery() then 't' else 'f' end,
        case when pg_is_in_recovery() then 0
             else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end,
        (select system_identifier from pg_control_system())" 2>/dev/null
}

# find_primary [sysid]: looks at every peer once. Sets PRIMARY ("host port"), PRIMARY_TL,
# PEERS_SILENT (how many did not answer) and PEER_SUMMARY (for the log). Returns 0 if a primary
# was found. With a sysid, primaries of another cluster are ignored (and reported).
find_primary() {
    local want="${1:-}" hp h p out rec tl sid
    PRIMARY=""; PRIMARY_TL=0; PEERS_SILENT=0; PEER_SUMMARY=""
    local primaries=0
    for hp in "${PEERS[@]}"; do
        h="${hp% *}"; p="${hp#* }"
        if ! out="$(probe "$h" "$p")" || [ -z "$out" ]; then
            PEERS_SILENT=$((PEERS_SILENT + 1)); PEER_SUMMARY+=" $h:$p=no-answer"; continue
        fi
        read -r rec tl sid <<< "$out"
        if [ -n "$want" ] && [ "$sid" != "$want" ]; then
            PEER_SUMMARY+=" $h:$p=other-cluster($sid)"; continue
        fi
        if [ "$rec" = t ]; then PEER_SUMMARY+=" $h:$p=standby"; continue; fi
        PEER_SUMMARY+=" $h:$p=primary(timeline $tl)"
        primaries=$((primaries + 1))
        if [ "$tl" -gt "$PRIMARY_TL" ]; then PRIMARY="$h $p"; PRIMARY_TL="$tl"; fi
    done
    [ "$primaries" -gt 1 ] && loud "more than one primary answers:$PEER_SUMMARY" \
        "following the one on the newest timeline: ${PRIMARY% *} (timeline $PRIMARY_TL)"
    [ -n "$PRIMARY" ]
}

wait_for_primary() {
    local deadline=$(( $(date +%s) + WAIT_PRIMARY )) next_log=0 now
    log "waiting up to ${WAIT_PRIMARY}s for a primary among:$(printf ' %s' "${PEERS[@]/ /:}")"
    while :; do
        if find_primary; then
            log "primary found: ${PRIMARY/ /:} (timeline $PRIMARY_TL)"
            return 0
        fi
        now=$(date +%s)
        [ "$now" -lt "$deadline" ] || die "no primary answered within ${WAIT_PRIMARY}s (peers:$PEER_SUMMARY); giving up (the restart policy will retry)"
        if [ "$now" -ge "$next_log" ]; then
            log "no primary yet ($(( deadline - now ))s left):$PEER_SUMMARY"
            next_log=$(( now + 5 ))
        fi
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------------------
# local data directory
have_data() { [ -s "$PGDATA/PG_VERSION" ]; }
controldata() { as_pg pg_controldata "$PGDATA" | sed -n "s/^$1: *//p"; }
local_timeline() {
    local a b
    a="$(controldata "Latest checkpoint's TimeLineID")"
    b="$(controldata "Min recovery ending loc's timeline")"
    [ "${b:-0}" -gt "${a:-0}" ] && a="$b"
    printf '%s' "${a:-0}"
}

write_config() {
    as_pg mkdir -p "$PGDATA/conf.d"
    grep -qE "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf\.d'" "$PGDATA/postgresql.conf" ||
        printf "\n# pglb: settings managed by the image entrypoint\ninclude_dir = 'conf.d'\n" | as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null
    as_pg tee "$PGDATA/conf.d/00-pglb.conf" >/dev/null <<'EOF'
# Written by the pglb image entrypoint at every start: edits here are lost.
# Use ALTER SYSTEM (postgresql.auto.conf) for your own settings. listen_addresses, port and
# cluster_name are on the server's command line (the entrypoint), where pg_rewind cannot
# overwrite them.
unix_socket_directories = '/var/run/postgresql'
password_encryption = 'scram-sha-256'

# replication
wal_level = replica
wal_log_hints = on                  # pg_rewind needs it (data checksums are on as well)
max_wal_senders = 16
max_replication_slots = 16
wal_keep_size = '256MB'             # lets a rewound or slot-less standby catch up
max_slot_wal_keep_size = '2GB'      # a forgotten slot cannot fill the disk
hot_standby = on
wal_sender_timeout = '5s'           # notice a dead standby / primary within seconds
wal_receiver_timeout = '5s'
wal_receiver_status_interval = '1s'
wal_retrieve_retry_interval = '1s'  # a standby retries its upstream every second
recovery_target_timeline = 'latest'

# logging to stderr = docker logs
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    # before the settings moved to the command line, the node's name was kept here
    rm -f "$PGDATA/conf.d/99-node.conf"
    as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<EOF
# Written by the pglb image entrypoint at every start: edits here are lost.
# TYPE  DATABASE     USER      ADDRESS  METHOD
local   all          postgres           peer
local   all          all                scram-sha-256
host    replication  all       all      scram-sha-256
host    all          all       all      scram-sha-256
EOF
}

# Point this (standby) node at host:port: primary_conninfo and primary_slot_name go to
# postgresql.auto.conf, where pg_basebackup -R, pg_rewind -R and ALTER SYSTEM put them too.
set_upstream() {
    local h="$1" p="$2" f="$PGDATA/postgresql.auto.conf" tmp
    tmp="$(mktemp)"
    [ -f "$f" ] && grep -vE '^[[:space:]]*(primary_conninfo|primary_slot_name)[[:space:]]*=' "$f" > "$tmp" || true
    {
        printf "primary_conninfo = 'host=%s port=%s user=%s passfile=%s application_name=%s connect_timeout=5 keepalives_idle=5 keepalives_interval=2 keepalives_count=3'\n" \
            "$h" "$p" "$REPL_USER" "$PASSFILE" "$NODE"
        printf "primary_slot_name = '%s'\n" "$SLOT"
    } >> "$tmp"
    as_pg tee "$f" < "$tmp" >/dev/null
    rm -f "$tmp"
    as_pg touch "$PGDATA/standby.signal"
    log "standby of $h:$p, replication slot $SLOT"
}

# A standby that starts while no primary answers keeps its upstream, but reads the replication
# password from the passfile written at this start: a primary_conninfo with an inline password
# (the promoter's re-pointing writes one) would keep an old password after a change in .env.
refresh_upstream() {
    local line h p
    line="$(grep -E '^[[:space:]]*primary_conninfo[[:space:]]*=' "$PGDATA/postgresql.auto.conf" 2>/dev/null | tail -n 1)" || true
    h="$(printf '%s' "$line" | sed -nE "s/.*[' ]host=([A-Za-z0-9._-]+).*/\1/p")"
    p="$(printf '%s' "$line" | sed -nE "s/.*[' ]port=([0-9]+).*/\1/p")"
    if [ -n "$h" ]; then
        set_upstream "$h" "${p:-5432}"
    else
        log "no host in this standby's primary_conninfo; leaving it as it is"
    fi
}

# Make sure our physical slot exists on host:port (it does not after a failover or a rewind).
ensure_slot() {
    local h="$1" p="$2" n
    n="$(peer_sql "$h" "$p" "select count(*) from pg_replication_slots where slot_name = '$SLOT'")" || {
        log "could not check replication slot $SLOT on $h:$p; starting anyway"; return 0; }
    if [ "$n" = 0 ]; then
        if peer_sql "$h" "$p" "select pg_create_physical_replication_slot('$SLOT', true)" >/dev/null; then
            log "created replication slot $SLOT on $h:$p"
        else
            log "could not create replication slot $SLOT on $h:$p; starting anyway"
        fi
    fi
}

# ---------------------------------------------------------------------------------------------------
# the three cases
init_primary() {
    local mark="$VOLUME_DIR/.pglb-initdb-in-progress" pwfile
    log "first start of the initial primary: initdb"
    as_pg touch "$mark"
    pwfile="$(as_pg mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" | as_pg tee "$pwfile" >/dev/null
    as_pg initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 --data-checksums >/dev/null
    rm -f "$pwfile"
    write_config

    reconcile_roles || die "could not create the roles (see above)"
    rm -f "$mark"
    INITIALISED=1
    log "initialised"
}

# Roles from the environment: creates the missing ones and sets every password, on a temporary
# server that listens on the Unix socket only (no client can log in with an old password meanwhile).
# Runs on the node that starts as the primary; standbys receive the result through replication.
# The passwords reach psql through its environment (\getenv), never its command line.
reconcile_roles() {
    local app_user="${APP_USER:-}" app_db="${APP_DB:-${APP_USER:-}}"
    log "starting a temporary server on the Unix socket only, to set roles and passwords"
    TEMP_SERVER=1
    node_options ""
    as_pg pg_ctl -D "$PGDATA" -w -t 300 -o "${NODE_OPTS[*]}" start >&2 || return 1
    local rc=0
    as_pg psql -X -q -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -U postgres -d postgres \
        -v repl_user="$REPL_USER" -v check_user="$CHECK_USER" -v promoter_user="$PROMOTER_USER" \
        -v make_promoter="$([ -n "${PGLB_PROMOTER_PASSWORD:-}" ] && [ "$PROMOTER_USER" != postgres ] && echo 1 || echo 0)" \
        -v app_user="$app_user" -v app_db="$app_db" \
        -v make_app_user="$([ -n "$app_user" ] && [ "$app_user" != postgres ] && echo 1 || echo 0)" \
        -v make_app_db="$([ -n "$app_db" ] && [ "$app_db" != postgres ] && echo 1 || echo 0)" <<'SQL' || rc=$?
\set postgres_pw ''
\set repl_pw ''
\set check_pw ''
\set promoter_pw ''
\set app_pw ''
\getenv postgres_pw POSTGRES_PASSWORD
\getenv repl_pw PGLB_REPLICATION_PASSWORD
\getenv check_pw PGLB_CHECK_PASSWORD
\getenv promoter_pw PGLB_PROMOTER_PASSWORD
\getenv app_pw APP_PASSWORD
-- no synchronous standby can answer a server without TCP listeners
SET synchronous_commit = local;
SET client_min_messages = warning;
ALTER ROLE postgres PASSWORD :'postgres_pw';
-- replication: pg_basebackup and the standbys' walreceivers
SELECT format('CREATE ROLE %I', :'repl_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'repl_user') \gexec
ALTER ROLE :"repl_user" WITH LOGIN REPLICATION PASSWORD :'repl_pw';
-- pglb's health checks: login + pg_monitor, nothing else
SELECT format('CREATE ROLE %I', :'check_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'check_user') \gexec
ALTER ROLE :"check_user" WITH LOGIN PASSWORD :'check_pw';
GRANT pg_monitor TO :"check_user";
\if :make_promoter
-- the promoter: promote, checkpoint, slots, and what pg_rewind needs from its source server
SELECT format('CREATE ROLE %I', :'promoter_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'promoter_user') \gexec
ALTER ROLE :"promoter_user" WITH LOGIN REPLICATION PASSWORD :'promoter_pw';
GRANT pg_monitor, pg_checkpoint TO :"promoter_user";
GRANT EXECUTE ON FUNCTION pg_promote(boolean, integer) TO :"promoter_user";
GRANT EXECUTE ON FUNCTION pg_ls_dir(text, boolean, boolean) TO :"promoter_user";
GRANT EXECUTE ON FUNCTION pg_stat_file(text, boolean) TO :"promoter_user";
GRANT EXECUTE ON FUNCTION pg_read_binary_file(text) TO :"promoter_user";
GRANT EXECUTE ON FUNCTION pg_read_binary_file(text, bigint, bigint, boolean) TO :"promoter_user";
\endif
\if :make_app_user
SELECT format('CREATE ROLE %I', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
ALTER ROLE :"app_user" WITH LOGIN PASSWORD :'app_pw';
\endif
\if :make_app_db
SELECT format('CREATE DATABASE %I OWNER %I', :'app_db', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'app_db') \gexec
\endif
SQL
    as_pg pg_ctl -D "$PGDATA" -m fast -w stop >&2 || die "could not stop the temporary server"
    TEMP_SERVER=0
    [ "$rc" = 0 ] || return 1
    log "roles and passwords set from the environment: postgres, $REPL_USER, $CHECK_USER$([ -n "${PGLB_PROMOTER_PASSWORD:-}" ] && [ "$PROMOTER_USER" != postgres ] && printf ', %s' "$PROMOTER_USER")${app_user:+, $app_user (database $app_db)}"
}

# Clone host:port into an empty $PGDATA and configure a standby of it.
clone_from() {
    local h="$1" p="$2" mark="$VOLUME_DIR/.pglb-clone-in-progress" n slot_opts=()
    n="$(peer_sql "$h" "$p" "select case when active then 'active' else 'idle' end from pg_replication_slots where slot_name = '$SLOT'")" || n="?"
    case "$n" in
        active) die "replication slot $SLOT on $h:$p is in use by another server; is another node also called $NODE?" ;;
        idle) slot_opts=(-S "$SLOT"); log "reusing the existing replication slot $SLOT on $h:$p" ;;
        *) slot_opts=(-C -S "$SLOT") ;;
    esac
    log "pg_basebackup from $h:$p (slot $SLOT, WAL streamed)"
    as_pg touch "$mark"
    rm -rf "$PGDATA"
    as_pg mkdir -m 0700 "$PGDATA"
    local start; start=$(date +%s)
    as_pg pg_basebackup -D "$PGDATA" -d "$(conninfo "$h" "$p" "$REPL_USER")" -R "${slot_opts[@]}" \
        -X stream --checkpoint=fast --no-password ||
        die "pg_basebackup from $h:$p failed (the restart policy will retry)"
    rm -f "$mark"
    log "base backup done in $(( $(date +%s) - start ))s"
    set_upstream "$h" "$p"
}

# This node has data but a peer is a primary on a newer timeline: rewind to it and follow it.
rejoin() {
    local h="$1" p="$2" was="$3" state hidden=0
    loud "$NODE was a $was on timeline $(local_timeline); $h:$p is a primary on timeline $PRIMARY_TL" \
         "rewinding $NODE with pg_rewind to come back as a standby of $h:$p"
    # pg_rewind reads the source's pg_control: make it show the new timeline (a just-promoted
    # server only writes it at its next checkpoint)
    peer_sql "$h" "$p" "checkpoint" >/dev/null || log "CHECKPOINT on $h:$p failed; trying pg_rewind anyway"
    state="$(controldata "Database cluster state")"
    # pg_rewind brings an unclean target to a clean shutdown in single-user mode, which refuses
    # standby.signal: hide it meanwhile (plain crash recovery, then pg_rewind does its job)
    if [ -f "$PGDATA/standby.signal" ] && [ "$state" != "shut down in recovery" ]; then
        mv "$PGDATA/standby.signal" "$VOLUME_DIR/standby.signal.rewind"; hidden=1
    fi
    local start; start=$(date +%s)
    if as_pg pg_rewind --target-pgdata="$PGDATA" --source-server="$(conninfo "$h" "$p" postgres)" 2>&1 |
        sed -u 's/^/  pg_rewind: /' >&2; then
        rm -f "$VOLUME_DIR/standby.signal.rewind"
        log "pg_rewind done in $(( $(date +%s) - start ))s"
        if [ "$was" = primary ]; then
            # slots of the old primary are meaningless now and would pin WAL on this standby
            rm -rf "${PGDATA:?}"/pg_replslot/*
        fi
        set_upstream "$h" "$p"
        ensure_slot "$h" "$p"
    else
        [ "$hidden" = 1 ] && mv "$VOLUME_DIR/standby.signal.rewind" "$PGDATA/standby.signal" 2>/dev/null
        local aside="$VOLUME_DIR/pgdata.before-rebuild"
        loud "pg_rewind FAILED: rebuilding $NODE from a fresh base backup of $h:$p" \
             "the old data directory is kept in $aside (replacing any older one) for inspection;" \
             "transactions that only this node had are in there and NOT in the cluster"
        rm -rf "$aside"
        mv "$PGDATA" "$aside"
        clone_from "$h" "$p"
    fi
}

# ---------------------------------------------------------------------------------------------------
main() {
    log "node $NODE (initial primary: $PRIMARY_NAME), peers:$(printf ' %s' "${PEERS[@]/ /:}")"
    prepare_dirs
    write_passfile

    local m
    for m in "$VOLUME_DIR/.pglb-initdb-in-progress" "$VOLUME_DIR/.pglb-clone-in-progress"; do
        if [ -e "$m" ]; then
            loud "an earlier initdb/base backup of this node did not finish ($m); starting over"
            rm -rf "$PGDATA"; rm -f "$m"
        fi
    done
    if [ -e "$VOLUME_DIR/standby.signal.rewind" ] && have_data; then
        # an earlier rewind was interrupted; the node was a standby
        mv "$VOLUME_DIR/standby.signal.rewind" "$PGDATA/standby.signal"
    fi

    if ! have_data; then
        if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
            die "$PGDATA is not empty but holds no PostgreSQL cluster; refusing to touch it"
        fi
        if find_primary; then
            [ "$IS_INITIAL_PRIMARY" = 1 ] &&
                loud "$NODE is the initial primary but ${PRIMARY/ /:} is already a primary (timeline $PRIMARY_TL)" \
                     "cloning it instead of creating a new cluster"
            clone_from ${PRIMARY}
        elif [ "$IS_INITIAL_PRIMARY" = 1 ]; then
            init_primary
        else
            wait_for_primary
            clone_from ${PRIMARY}
        fi
    else
        local sysid tl role version
        version="$(cat "$PGDATA/PG_VERSION")"
        [ "$version" = "$PG_MAJOR" ] ||
            die "the data directory holds a PostgreSQL $version cluster and this image runs PostgreSQL $PG_MAJOR;" \
                "start it with PG_MAJOR=$version, or remove the volumes (compose/dc down -v: the data is lost)" \
                "to begin anew on $PG_MAJOR (an upgrade in place with pg_upgrade is not automated)"
        sysid="$(controldata "Database system identifier")"
        tl="$(local_timeline)"
        role=primary; [ -f "$PGDATA/standby.signal" ] && role=standby
        log "existing data directory: $role, timeline $tl, cluster state '$(controldata "Database cluster state")'"

        find_primary "$sysid" || true
        if [ "$role" = primary ] && [ -z "$PRIMARY" ] && [ "$PEERS_SILENT" -gt 0 ]; then
            # a newer primary may be among the silent ones: give them a moment before we become
            # a second primary
            local deadline=$(( $(date +%s) + PEER_WAIT ))
            log "no primary among the peers that answered; waiting up to ${PEER_WAIT}s for the others:$PEER_SUMMARY"
            while [ -z "$PRIMARY" ] && [ "$PEERS_SILENT" -gt 0 ] && [ "$(date +%s)" -lt "$deadline" ]; do
                sleep 1
                find_primary "$sysid" || true
            done
        fi
        log "peers:${PEER_SUMMARY:- none}"

        if [ -z "$PRIMARY" ]; then
            log "no other primary: starting as $role"
            [ "$role" = standby ] && refresh_upstream
        elif [ "$role" = primary ]; then
            if [ "$PRIMARY_TL" -gt "$tl" ]; then
                rejoin ${PRIMARY} primary
            elif [ "$PRIMARY_TL" -lt "$tl" ]; then
                loud "${PRIMARY/ /:} is a primary on an OLDER timeline ($PRIMARY_TL < $tl): it is stale and must be rewound;" \
                     "$NODE starts as the primary"
            else
                loud "${PRIMARY/ /:} is a primary on the same timeline $tl as this node: two primaries, no way to tell" \
                     "which one is right. Refusing to start. Fix by hand: keep one, then empty the other's volume."
                exit 1
            fi
        else
            if [ "$PRIMARY_TL" -gt "$tl" ]; then
                rejoin ${PRIMARY} standby
            else
                set_upstream ${PRIMARY}
                ensure_slot ${PRIMARY}
            fi
        fi
    fi

    write_config
    if [ ! -f "$PGDATA/standby.signal" ] && [ "$INITIALISED" = 0 ]; then
        reconcile_roles || loud "could not set roles and passwords from the environment (see above)" \
            "starting with the ones the database has: clients using the new passwords are refused"
    fi
    trap - ERR
    log "starting PostgreSQL $(as_pg postgres --version | awk '{print $3}') as $([ -f "$PGDATA/standby.signal" ] && echo standby || echo primary)"
    node_options '*'
    log "node settings on the command line: ${NODE_OPTS[*]}"
    if [ "$(id -u)" = 0 ]; then
        exec setpriv --reuid=postgres --regid=postgres --init-groups env HOME="$PGHOME" postgres -D "$PGDATA" "${NODE_OPTS[@]}"
    fi
    exec postgres -D "$PGDATA" "${NODE_OPTS[@]}"
}

main "$@"
