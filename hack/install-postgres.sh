#!/usr/bin/env bash
# Make sure the Debian PostgreSQL 15 server binaries and the `postgres` OS user exist.
# Idempotent and quick when they do. PostgreSQL 16 comes from the pgserver wheel (pip).
# No cluster is created or started here: the tests start their own servers.
set -euo pipefail

if [[ -x /usr/lib/postgresql/15/bin/postgres && -x /usr/lib/postgresql/15/bin/initdb ]] && id postgres >/dev/null 2>&1; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-postgres: PostgreSQL 15 is missing; run as root or: apt-get install postgresql-15" >&2
    exit 1
fi
echo "install-postgres: installing postgresql-15 from Debian"
export DEBIAN_FRONTEND=noninteractive
# Keep the package from creating and starting its own cluster.
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/00-poolbudget.conf
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null
id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
echo "install-postgres: $(/usr/lib/postgresql/15/bin/postgres --version)"
