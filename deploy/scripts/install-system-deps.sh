#!/usr/bin/env bash
# Installs the Debian packages vison's tests and demo use: prometheus (with promtool), a
# RabbitMQ broker, prometheus-alertmanager (for amtool: checks deploy/alertmanager) and
# docker-compose 1.29 (its engine-free `config` validates docker-compose.yml), PostgreSQL (the
# results catalogue's tests: 127.0.0.1:5432, user postgres, trust auth for local connections),
# and makes sure the broker and PostgreSQL run. Idempotent; does nothing when all is present.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v rabbitmqctl >/dev/null 2>&1 || need+=(rabbitmq-server)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
fresh_postgres=0
if ! command -v pg_ctlcluster >/dev/null 2>&1; then need+=(postgresql); fresh_postgres=1; fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-system-deps: missing ${need[*]} and not root: install them with apt-get" >&2
    exit 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian package may start its own daemon; vison starts prometheus itself when it needs it.
  (pkill -x prometheus || true) 2>/dev/null
fi
if command -v rabbitmqctl >/dev/null 2>&1 && ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "install-system-deps: starting rabbitmq-server" >&2
  rabbitmq-server -detached
  for _ in $(seq 1 60); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if [ "$fresh_postgres" = 1 ] && [ -f "/etc/postgresql/$version/main/pg_hba.conf" ]; then
    # installed just now, for the tests: trust local connections (127.0.0.1 and the socket) only
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    { echo "host all all 127.0.0.1/32 trust"; echo "local all all trust"; cat "$hba"; } > "$hba.vison" && mv "$hba.vison" "$hba"
    chown postgres:postgres "$hba" 2>/dev/null || true
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null 2>&1 || true
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      echo "install-system-deps: starting PostgreSQL $version" >&2
      pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
      for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    else
      echo "install-system-deps: PostgreSQL is down and not root: pg_ctlcluster $version main start" >&2
    fi
  fi
fi
exit 0
