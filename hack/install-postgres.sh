#!/usr/bin/env bash
# Make sure what the PostgreSQL tests need is installed: Debian's PostgreSQL 15 server
# binaries, PgBouncer (the client tests go through it in transaction pooling), and the
# `postgres` OS user both run as (they refuse to run as root).
# Idempotent and quick (no apt) when all is there. PostgreSQL 16 comes from the pgserver
# wheel (pip). No cluster or service is created or left running here: tests start their own.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin

have_all() {
    [[ -x $PG_BIN/postgres && -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] &&
        { command -v pgbouncer || [[ -x /usr/sbin/pgbouncer ]]; } >/dev/null 2>&1 &&
        id postgres >/dev/null 2>&1
}

if have_all; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-postgres: missing PostgreSQL 15, PgBouncer or the postgres user;" \
        "run as root or: apt-get install postgresql-15 pgbouncer" >&2
    exit 1
fi

echo "install-postgres: installing postgresql-15 and pgbouncer from Debian"
export DEBIAN_FRONTEND=noninteractive
# Keep the packages from creating a cluster or starting their services: a policy-rc.d
# that denies every start, only for the length of this install if there was none.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/00-poolbudget.conf
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql-15 pgbouncer >/dev/null
id postgres >/dev/null 2>&1 ||
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres

have_all || { echo "install-postgres: still incomplete after apt-get install" >&2; exit 1; }
echo "install-postgres: $($PG_BIN/postgres --version); $(/usr/sbin/pgbouncer --version | head -1)"
