#!/usr/bin/env bash
# Install the Debian packages the tests need: Postfix (the MTA under test), Cyrus SASL tools and
# modules (SMTP AUTH with a sasldb), and postfwd (postfwd2, the policy service the benchmark
# compares policyd with; tests/test_bench_smoke.py checks its answers), systemd (for
# systemd-analyze, which checks the shipped unit), prometheus (promtool checks the alert
# rules; the tests run its server on loopback) and redis-server with redis-tools (the shared
# sending-limit store; the tests start their own servers on unix sockets). Idempotent; asks
# nothing; starts no service (a policy-rc.d keeps the packages' init scripts from starting
# prometheus, redis-server or postfwd).
# postfwd's postinst does not start it (STARTUP=0 in /etc/default/postfwd; no init here).
set -euo pipefail

packages=(postfix sasl2-bin libsasl2-modules postfwd systemd prometheus redis-server redis-tools)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages present: ${packages[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: installing ${missing[*]} needs root (or sudo)" >&2
        exit 1
    fi
fi

echo "installing: ${missing[*]}"
# invoke-rc.d asks /usr/sbin/policy-rc.d; exit 101 means "do not start". Only ours is removed.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq
# "No configuration" leaves /etc/postfix/main.cf absent: the tests run a private instance only.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" </dev/null
