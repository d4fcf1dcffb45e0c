#!/usr/bin/env bash
# Sets up everything kernform needs on a fresh Debian machine, idempotently:
# Debian packages (kernel tools, bcc, nftables bindings, traffic tools), kernel
# headers where bcc looks for them, bpffs, and a Python venv in .venv that also
# sees Debian's bcc and nftables modules.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
APT_PACKAGES=(
  iproute2 nftables python3-nftables iptables bpftool
  python3-bpfcc libbpfcc bpfcc-tools libbpf1 linux-headers-amd64
  haproxy nginx-light wrk iperf3 socat curl python3-venv util-linux procps gcc libc6-dev strace
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's haproxy and nginx packages start system services when installed; kernform's lab runs its own
# instances inside namespaces and needs none on the host. Only a service this run installed is stopped
# (and said so): a host's own nginx or haproxy, installed before, is left as it is.
for svc in haproxy nginx; do
  pkg="$svc"; [[ "$svc" == nginx ]] && pkg=nginx-light
  if [[ " ${missing[*]-} " == *" $pkg "* ]] && command -v service >/dev/null 2>&1; then
    if service "$svc" stop >/dev/null 2>&1; then
      echo "setup: stopped the $svc service Debian started when installing $pkg (kernform runs its own in namespaces)"
    fi
  fi
done

# bcc compiles C at run time against /lib/modules/$(uname -r)/build.
KREL="$(uname -r)"
if [[ ! -e "/lib/modules/$KREL/build/include" ]]; then
  hdr="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)"
  common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)"
  if [[ -n "$hdr" ]]; then
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    ln -sfn "${common:-$hdr}" "/lib/modules/$KREL/source"
    echo "setup: linked kernel headers $hdr -> /lib/modules/$KREL/build"
  fi
fi

if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  mount -t bpf bpf /sys/fs/bpf 2>/dev/null || echo "setup: could not mount bpffs at /sys/fs/bpf" >&2
fi

# The venv uses the machine's default python3; Debian's bcc and nftables
# modules are pure Python over shared libraries, so a .pth file makes them
# importable without pulling all of dist-packages into the venv.
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p .venv/debian-modules
for mod in bcc nftables; do
  ln -sfn "/usr/lib/python3/dist-packages/$mod" ".venv/debian-modules/$mod"
done
echo "$(pwd)/.venv/debian-modules" > "$site/kernform-debian.pth"

stamp=".venv/.kernform-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,bench]'
  touch "$stamp"
fi
echo "setup: ready (.venv)"
