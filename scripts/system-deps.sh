#!/usr/bin/env bash
# The system packages the test suite needs (`make test` and .ci/run both call this).
# As root: installs the missing ones with apt-get. Otherwise: stops at once and prints the one
# command to run, so a fresh machine fails in the first second, not halfway through the suite.
set -euo pipefail

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# Modbus RTU tests run over a pseudo-terminal pair made by socat.
command -v socat >/dev/null 2>&1 || need+=(socat)
# The simulator's devices are also read and driven by a Modbus master we did not write.
command -v mbpoll >/dev/null 2>&1 || need+=(mbpoll)
# The procedure report is checked by rendering it in headless Chromium (CHROMIUM: test aid).
[ -x "${CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
else
  echo "missing system packages: ${need[*]}; install them with:" >&2
  echo "  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
