#!/bin/sh
# Installs, removes and purges the dots-agent and dots-client packages with
# dpkg in a throw-away copy of this system: an overlay of / (its changes in a
# tmpfs) in private mount and network namespaces, so the host's users,
# /etc, /var/lib, bpffs and interfaces are never touched. Run by
# tests/tests/packaging.rs as
#   unshare --mount --net --propagation private sh dpkg-lifecycle.sh WORKDIR AGENT.deb CLIENT.deb
# Fails, saying what, at the first thing that is not as the maintainer
# scripts promise. systemd does not run here, so nothing is started.
set -eu

work=$1 agent_deb=$2 client_deb=$3

fail() { echo "FAILED: $*" >&2; exit 1; }
in_root() { chroot "$root" "$@"; }
owner() { in_root stat -c '%U:%G %a' "$1"; }

mount -t tmpfs tmpfs "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
root=$work/root
mount --bind /proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t sysfs sysfs "$root/sys"
# A bpffs of its own: a new mount is a new, empty instance.
mount -t bpf bpf "$root/sys/fs/bpf"
mkdir -p "$root/tmp/debs"
cp "$agent_deb" "$client_deb" "$root/tmp/debs/"
ip link set lo up

echo "== install"
in_root sh -c 'dpkg -i /tmp/debs/*.deb'
for name in dots-agent dots-client; do
    in_root getent passwd "$name" | grep -q ':/usr/sbin/nologin$' || fail "no system user $name"
    [ "$(owner /var/lib/$name)" = "$name:$name 700" ] || fail "/var/lib/$name: $(owner /var/lib/$name)"
    [ -L "$root/etc/systemd/system/multi-user.target.wants/$name.service" ] || fail "$name.service not enabled"
done
[ "$(owner /sys/fs/bpf/dots-agent)" = "dots-agent:dots-agent 700" ] ||
    fail "/sys/fs/bpf/dots-agent: $(owner /sys/fs/bpf/dots-agent)"

echo "== an XDP program pinned by the packaged agent, and an edited conffile"
in_root dots-agent dataplane attach --lan lo --mode generic --bpffs /sys/fs/bpf/dots-agent
[ -e "$root/sys/fs/bpf/dots-agent/link_lo" ] || fail "no link pinned"
ip link show lo | grep -q xdpgeneric || fail "XDP not on lo"
echo "# edited by the administrator" >>"$root/etc/dots-agent/agent.toml"

echo "== remove"
in_root dpkg -r dots-agent dots-client
if ip link show lo | grep -q xdp; then fail "XDP still on lo after removal"; fi
[ ! -e "$root/sys/fs/bpf/dots-agent/link_lo" ] || fail "link still pinned after removal"
grep -q "edited by the administrator" "$root/etc/dots-agent/agent.toml" || fail "conffile lost on removal"
[ -d "$root/var/lib/dots-agent" ] || fail "state removed before purge"
[ ! -e "$root/usr/bin/dots-agent" ] || fail "binary left after removal"

echo "== purge"
in_root dpkg -P dots-agent dots-client
for name in dots-agent dots-client; do
    [ ! -e "$root/etc/$name" ] || fail "/etc/$name left after purge"
    [ ! -e "$root/var/lib/$name" ] || fail "/var/lib/$name left after purge"
    [ ! -e "$root/etc/systemd/system/multi-user.target.wants/$name.service" ] ||
        fail "$name.service still enabled after purge"
done
if in_root dpkg-query -W dots-agent dots-client >/dev/null 2>&1; then fail "packages still known to dpkg"; fi
echo "== lifecycle ok"
