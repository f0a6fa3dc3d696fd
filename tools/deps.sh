#!/bin/sh
# Install everything amavisd needs on Debian 12, idempotently: apt packages
# (only when one is missing), a virtualenv in .venv with the project in
# editable mode, and the fast amavisd-client launcher.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# clamav-daemon/clamdscan/clamav-testfiles: the scanner and its test files;
# amavisd-new: the reference daemon and the real AM.PDP clients
# (amavisd-submit, amavisd-release); postfix/swaks/miltertest/amavisd-milter
# (Debian's C AM.PDP milter): MTA integration tests; m4/liblockfile1/libwrap0:
# what the unpacked Sendmail needs (it must not be apt-installed beside Postfix);
# the rest: real archivers and decoders, for decoding and for making test
# fixtures (jlha-utils, rpm's rpmbuild, bsdtar and ar only make fixtures);
# prometheus: promtool and a server the metrics tests start privately (the
# system service is kept from starting, below); faketime: libfaketime, the
# wall-clock jump of tests/integration/test_faults_clock.py.
APT_PACKAGES="clamav-daemon clamav clamdscan clamav-testfiles amavisd-new postfix swaks
  miltertest amavisd-milter m4 liblockfile1 libwrap0
  hyperfine libmagic1 file sharutils macutils unar arj lhasa 7zip cabextract ncompress
  gcab cpio genisoimage zip unzip xz-utils zstd lz4 lzip bzip2 arc nomarch tnef
  jlha-utils rpm libarchive-tools binutils prometheus faketime"

missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "deps: missing Debian packages:$missing (run as root, or apt-get install them)" >&2
        exit 1
    fi
    echo "deps: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix must not configure a live MTA: tests run private instances.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -q
    # No system Prometheus (it would take port 9090 and scrape nothing of ours):
    # policy-rc.d keeps its maintainer scripts from starting it, unless the
    # machine already has a policy (containers' "start nothing").
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# tools/deps.sh, during apt-get only\nfor a; do case "$a" in prometheus|prometheus.service) exit 101;; esac; done\nexit 0\n' > "$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends $missing
    if grep -qs "tools/deps.sh" "$policy"; then rm -f "$policy"; fi
    trap - EXIT
    if echo "$missing" | grep -qw prometheus && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

# Sendmail for the MTA tests, unpacked (never installed: it would remove
# Postfix) into var/sendmail-root; tests skip when it is absent.
SENDMAIL_ROOT=${SENDMAIL_ROOT:-var/sendmail-root}
if [ ! -x "$SENDMAIL_ROOT/usr/libexec/sendmail/sendmail" ] && [ "$(id -u)" -eq 0 ]; then
    debs=$(mktemp -d)
    if (cd "$debs" && apt-get download -q sendmail-bin sendmail-base sendmail-cf >/dev/null 2>&1); then
        mkdir -p "$SENDMAIL_ROOT"
        for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$SENDMAIL_ROOT"; done
        echo "deps: unpacked Sendmail into $SENDMAIL_ROOT"
    else
        echo "deps: could not download Sendmail's packages; its tests will skip" >&2
    fi
    rm -rf "$debs"
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test,bench]'
    touch "$stamp"
fi

# The client runs once per message from the MTA: start it with -I -S (no
# site-packages scan, ~25 ms saved here) and put the project on sys.path
# by hand. "-IS" must be one word: Linux passes one shebang argument.
root=$(pwd)
cat > "$VENV/bin/amavisd-client" <<LAUNCHER
#!$root/$VENV/bin/python -IS
import sys
sys.path.insert(0, "$root")
from amavisd_client.client import main
sys.exit(main())
LAUNCHER
chmod 755 "$VENV/bin/amavisd-client"
