#!/bin/sh
# Installs Debian's `prometheus` package (it brings `prometheus` and `promtool`) for the tests of
# deploy/prometheus/ (tests/test_alerts.py). Run as root; `make install` calls it (directly as
# root, or through `sudo -n`) when `prometheus` is not on the PATH.
#
# The package ships a service. Its maintainer scripts start it through invoke-rc.d or
# deb-systemd-invoke, and both ask /usr/sbin/policy-rc.d first. While the package is installed, a
# temporary policy-rc.d answers 101 ("action forbidden"), so no Prometheus daemon is started,
# whether or not systemd runs. The script removes that file again, and leaves an existing
# policy-rc.d alone. On a machine that runs systemd the service stays *enabled*, so it starts at
# the next boot: `systemctl disable --now prometheus` turns it off.
set -eu

POLICY=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# temporary, from fedblock deploy/prometheus/install-prometheus.sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT INT TERM

apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus

promtool --version 2>&1 | head -n 1
if pgrep -x prometheus > /dev/null 2>&1; then
    echo "note: a prometheus daemon is running on this machine (port 9090); the tests do not use it and it is harmless"
fi
