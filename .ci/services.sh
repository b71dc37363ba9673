#!/usr/bin/env bash
# Make the real services the integration tests use available on this machine (idempotent):
# Dovecot binaries for the IMAP tests (each test starts its own rootless instance) and a
# RabbitMQ broker on 127.0.0.1:5672 (guest/guest). PostgreSQL is the lead's part of .ci/run.
set -euo pipefail

#: How long RabbitMQ gets to open its port after a start.
RABBIT_START_TIMEOUT_S=90

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# --- Dovecot (IMAP) -------------------------------------------------------------------
if ! have dovecot; then
  echo "services: installing Dovecot (dovecot-imapd)"
  apt_install dovecot-imapd
fi
echo "services: dovecot $(/usr/sbin/dovecot --version 2>/dev/null || dovecot --version)"

# --- RabbitMQ ---------------------------------------------------------------------------
if port_open 5672; then
  echo "services: RabbitMQ already listening on 127.0.0.1:5672"
else
  if ! have rabbitmq-server; then
    echo "services: installing rabbitmq-server"
    apt_install rabbitmq-server
  fi
  echo "services: starting RabbitMQ (rabbitmq-server -detached)"
  as_root rabbitmq-server -detached
  waited=0
  until port_open 5672; do
    if [ "$waited" -ge "$RABBIT_START_TIMEOUT_S" ]; then
      echo "services: RabbitMQ did not open 127.0.0.1:5672 within ${RABBIT_START_TIMEOUT_S}s" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "services: RabbitMQ up after ${waited}s"
fi
