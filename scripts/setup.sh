#!/usr/bin/env bash
# Idempotent setup of a vmrepl host (Debian 12, as root): Debian packages, .venv with vmrepl,
# /dev/kvm for the kvm group, virtlogd + libvirtd running. A second run takes seconds.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
say() { printf 'setup: %s\n' "$*"; }

packages=(qemu-system-x86 qemu-system-common qemu-utils python3-libnbd libnbd-bin
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config gcc python3-dev python3-venv
  openssh-server openssh-client iproute2 rsync util-linux procps ovmf)  # ovmf: UEFI guests (tests)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# The venv uses Debian's python3: libnbd's binding exists only as a Debian package.
venv="$top/.venv"
if [[ ! -x "$venv/bin/python" ]]; then
  say "creating $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
stamp="$venv/.vmrepl-installed"
want=$(sha256sum "$top/pyproject.toml" | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  say "installing vmrepl (editable) and its Python dependencies"
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$top[test,bench]"
  echo "$want" >"$stamp"
else
  say "venv up to date"
fi
"$venv/bin/python" -c 'import nbd, libvirt, qemu.qmp, paramiko, zstandard' \
  || { say "the venv cannot import its dependencies; remove $venv and re-run"; exit 1; }

# Test and demo VM images live in run/ below the checkout: libvirt-qemu must be able to reach it.
dir=$top
while [[ $dir != / ]]; do
  [[ $(stat -c %A "$dir") == *[xt] ]] || { say "$dir is not searchable by others (chmod o+x it): libvirt-qemu cannot reach run/"; exit 1; }
  dir=$(dirname "$dir")
done

# libvirt-qemu must be able to use KVM, otherwise every libvirt call re-probes QEMU.
if [[ -e /dev/kvm ]]; then
  chgrp kvm /dev/kvm && chmod 660 /dev/kvm
fi

# `vmrepl` on root's PATH (ssh forced commands, the libvirt hook), and the libvirt hook itself, which
# libvirtd only picks up when it starts: restart it (by PID, there is no systemd here) when the hook changed.
[[ "$(readlink /usr/local/bin/vmrepl)" == "$venv/bin/vmrepl" ]] || ln -sfn "$venv/bin/vmrepl" /usr/local/bin/vmrepl
hook=/etc/libvirt/hooks/qemu.d/vmrepl
restart_libvirtd=false
if ! cmp -s "$top/hooks/qemu" "$hook"; then
  say "installing the libvirt hook $hook"
  install -D -m 0755 "$top/hooks/qemu" "$hook"
  restart_libvirtd=true
fi

if [[ -d /run/systemd/system ]]; then
  $restart_libvirtd && systemctl restart libvirtd
  systemctl start virtlogd libvirtd
else
  # This host's daemons are the ones named by the pid files in /run (the test bed's second host runs
  # its own libvirtd and virtlogd in a namespace, with a /run of their own).
  running() { local pid; pid=$(cat "/run/$1.pid" 2>/dev/null) && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]] && echo "$pid"; }
  running virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
  if $restart_libvirtd && pid=$(running libvirtd); then
    say "restarting libvirtd (pid $pid) to load the hook"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if ! running libvirtd >/dev/null; then
    say "starting libvirtd"
    libvirtd -d
  fi
fi
for _ in $(seq 60); do
  virsh -q -c qemu:///system uri >/dev/null 2>&1 && break
  sleep 0.5
done
virsh -q -c qemu:///system uri >/dev/null || { say "libvirtd does not answer"; exit 1; }
say "ready: $venv/bin/vmrepl"
