#!/usr/bin/env bash
# Installs the Debian packages Liftoff's demo and tests run: the PostgreSQL 15 server (a Supabase-shaped
# source and a target), its client tools, pgcopydb (the benchmark's baseline), OpenSSH's sshd (the VPS the
# cutover's SSH switch reaches), redis-server (the cutover's checklist, the cache phase), PgBouncer (the
# pooler phase), iproute2's `ss` (the health and security checks over SSH), pgbackrest (point-in-time
# recovery) and redis-tools (redis-cli --rdb: the Redis backup tier); with the argument `bench`, also rclone
# (the object benchmark's baseline). Idempotent: it only calls apt when something is missing.
set -euo pipefail
missing=()
if [ "${1:-}" = bench ]; then command -v rclone >/dev/null 2>&1 || missing+=(rclone); fi
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pg_dump ] || missing+=(postgresql-client-15)
command -v pgcopydb >/dev/null 2>&1 || missing+=(pgcopydb)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v pgbackrest >/dev/null 2>&1 || missing+=(pgbackrest)
[ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)  # the pooler phase's tests run the real one
command -v ss >/dev/null 2>&1 || missing+=(iproute2)  # the health and security checks read `ss` over SSH
[ -x /usr/sbin/ufw ] || missing+=(ufw)  # the security tests run the real ufw in a network namespace of their own
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the browser test drives it through Playwright
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "liftoff: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "liftoff: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
id postgres >/dev/null 2>&1 || { echo "liftoff: no 'postgres' system user; install postgresql-15" >&2; exit 1; }
