#!/bin/busybox sh
# /init of the test VM (see xtask/src/vm/initramfs.rs). It prepares the kernel, runs the
# command from the per-run archive (/xtask/run.sh, with settings in /xtask/run.env), prints
# the exit marker the host waits for, and powers off. Its own chatter goes to the console
# only with --verbose; the host hides everything before the start marker unless --verbose.
export PATH=/xtask/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /xtask/run.env

say() { [ "$XTASK_VERBOSE" = 1 ] && echo "init: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev || mount -t tmpfs -o mode=0755 tmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
# Files the host included under /tmp or /run stay visible: mount over them only when empty.
for dir in /tmp /run; do
    if [ -z "$(ls -A "$dir" 2>/dev/null)" ]; then mount -t tmpfs -o mode=1777 tmpfs "$dir"; fi
done
chmod 1777 /tmp
mkdir -p /run/netns /var/lib /root
ln -sfn /proc/self/fd /dev/fd 2>/dev/null
hostname ipvs-vm

# The kernel asks this program for modules on demand (iptables matches, ipset types).
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
# IPVS refuses IPv4 real servers until a local route exists.
/usr/bin/ip link set lo up

ipvs_modules=$(cd "/lib/modules/$(uname -r)/kernel/net/netfilter/ipvs" && ls | sed -n 's/\.ko.*$//p')
say "loading modules:" $ipvs_modules
/usr/sbin/modprobe -a $ipvs_modules dummy veth \
    nf_conntrack nf_conntrack_netlink nf_nat nf_tables nft_compat nft_chain_nat \
    ip_tables ip6_tables iptable_filter iptable_nat iptable_mangle \
    ip6table_filter ip6table_nat ip6table_mangle ip_set br_netfilter \
    || echo "init: some modules did not load; see modprobe's message above"

# Run the command where the host ran it.
mkdir -p "$XTASK_CWD"
cd "$XTASK_CWD" || exit 1
export HOME=/root IPVS_PROXY_VM=1
say "running the command in $XTASK_CWD"
echo "XTASK-VM-START-$XTASK_NONCE"
/bin/sh /xtask/run.sh </dev/null
status=$?
echo "XTASK-VM-EXIT-$XTASK_NONCE $status"
sync
poweroff -f
