#!/usr/bin/env bash
# Builds the guest for the power-cut tests (tests/power.rs): a Debian kernel and
# an initramfs holding busybox, the virtio/ext4 modules, the ferry binary under
# test (with the shared libraries it links) and tests/power/init.
#
#   bash tests/power/kit.sh KIT_DIR FERRY_BIN
#
# Writes KIT_DIR/vmlinuz and KIT_DIR/base.cpio (newc). The test appends a
# second cpio archive with the run's certificates (the kernel unpacks
# concatenated archives in order). The kernel package is fetched once with
# `apt-get download` into $FERRY_POWER_CACHE (default KIT_DIR/cache) and unpacked there (no postinst runs,
# nothing is installed on the host). Needs busybox-static (/bin/busybox).
set -euo pipefail
kit=${1:?usage: kit.sh KIT_DIR FERRY_BIN}
ferry=${2:?usage: kit.sh KIT_DIR FERRY_BIN}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bb=${BUSYBOX:-/bin/busybox}
[[ -x $bb ]] || { echo "kit.sh: $bb missing (apt-get install busybox-static)" >&2; exit 1; }
"$bb" --list | grep -x depmod >/dev/null || { echo "kit.sh: $bb has no depmod applet (use busybox-static)" >&2; exit 1; }
mkdir -p "$kit"
kit=$(cd "$kit" && pwd)
# the unpacked kernel package is shared (FERRY_POWER_CACHE); concurrent runs take turns
cache=${FERRY_POWER_CACHE:-$kit/cache}
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9

# --- the kernel: linux-image-amd64's current version, unpacked once
if [[ ! -f $cache/unpacked ]]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [[ -n $pkg ]] || { echo "kit.sh: apt-cache knows no linux-image-amd64 (apt-get update?)" >&2; exit 1; }
    (cd "$cache" && rm -f ./*.deb && apt-get download -q "$pkg" >/dev/null 2>&1) \
        || { apt-get update -qq && (cd "$cache" && apt-get download -q "$pkg" >/dev/null); }
    rm -rf "$cache/x"
    dpkg-deb -x "$cache"/"$pkg"_*.deb "$cache/x"
    touch "$cache/unpacked"
fi
vmlinuz=$(ls "$cache"/x/boot/vmlinuz-* | head -1)
kver=${vmlinuz##*/vmlinuz-}
cp "$vmlinuz" "$kit/vmlinuz"

# --- the initramfs tree
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,mnt,tmp,etc,lib64,lib/x86_64-linux-gnu}
cp "$bb" "$stage/bin/busybox"
src=$cache/x/lib/modules/$kver
dst=$stage/lib/modules/$kver
for m in kernel/drivers/virtio kernel/drivers/block/virtio_blk.ko kernel/drivers/net/virtio_net.ko \
         kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/fs/ext4 kernel/fs/jbd2 \
         kernel/fs/mbcache.ko kernel/lib/crc16.ko kernel/crypto/crc32c_generic.ko \
         kernel/arch/x86/crypto/crc32c-intel.ko kernel/lib/libcrc32c.ko; do
    [[ -e $src/$m ]] || continue
    mkdir -p "$dst/$(dirname "$m")"
    cp -r "$src/$m" "$dst/$(dirname "$m")/"
done
cp "$src"/modules.order "$src"/modules.builtin* "$dst/" 2>/dev/null || true
"$bb" depmod -b "$stage" "$kver"
# ferry, stripped, and what it links (a dynamic binary: the test's own build)
strip -o "$stage/bin/ferry" "$ferry"
for lib in $(ldd "$ferry" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    cp -L "$lib" "$stage$lib" 2>/dev/null || { mkdir -p "$stage$(dirname "$lib")"; cp -L "$lib" "$stage$lib"; }
done
install -m 0755 "$here/init" "$stage/init"
install -m 0755 "$here/writer.sh" "$stage/bin/writer.sh"
echo "$kver" >"$stage/etc/kernel-version"
flock -u 9
(cd "$stage" && find . | "$bb" cpio -o -H newc 2>/dev/null) >"$kit/base.cpio.tmp"
mv "$kit/base.cpio.tmp" "$kit/base.cpio"
echo "kit.sh: $kit/vmlinuz ($kver), $kit/base.cpio ($(du -m "$kit/base.cpio" | cut -f1) MiB)"
