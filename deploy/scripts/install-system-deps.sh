#!/usr/bin/env bash
# Installs the Debian packages vison's tests and demo use: prometheus (with promtool), a
# RabbitMQ broker, prometheus-alertmanager (for amtool: checks deploy/alertmanager) and
# docker-compose 1.29 (its engine-free `config` validates docker-compose.yml), and makes sure
# the broker runs. Idempotent; does nothing when all is present.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v rabbitmqctl >/dev/null 2>&1 || need+=(rabbitmq-server)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
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
exit 0
