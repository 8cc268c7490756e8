#!/usr/bin/env bash
# Builds ferry's runtime image without pulling anything: a statically linked
# ferry (glibc, +crt-static) built on this host, put into a FROM scratch image.
# Also builds the playground's helper image (ferry + a static busybox) used by
# docker/compose.yaml for the certificate init step and the writer app.
#
#   bash docker/build-image.sh            # ferry:dev, ferry-playground:dev
#
# Env: FERRY_IMAGE (default ferry:dev), FERRY_PLAYGROUND_IMAGE
# (default ferry-playground:dev), BUSYBOX (default /bin/busybox; installed from
# Debian's busybox-static package when missing and apt-get is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

image=${FERRY_IMAGE:-ferry:dev}
playground=${FERRY_PLAYGROUND_IMAGE:-ferry-playground:dev}
busybox=${BUSYBOX:-/bin/busybox}
target=x86_64-unknown-linux-gnu
bin=target/static/$target/release/ferry

echo "== static ferry binary ($bin)"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --quiet --target "$target" --target-dir target/static -p ferry
# a dynamic executable names its loader (PT_INTERP); a static(-pie) one does not
command -v readelf >/dev/null || { echo "error: readelf (binutils) is needed" >&2; exit 1; }
is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'program interpreter'; }
if ! is_static "$bin"; then
    echo "error: $bin is dynamically linked; a scratch image needs a static binary" >&2
    exit 1
fi

# images these tags named before, removed after the build if replaced (no pile of <none> images)
old_ids=$(docker image inspect -f '{{.Id}}' "$playground" "$image" 2>/dev/null || true)

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# --- ferry:dev (same layout as docker/Dockerfile's runtime stage)
r=$ctx/ferry
mkdir -p "$r/rootfs/usr/local/bin" "$r/rootfs/etc/ssl/certs" "$r/rootfs/tmp" \
    "$r/owned/data" "$r/owned/certs"
# the image gets a stripped binary; its debug info stays apart on this host
# ($bin.debug and $bin.dwp, see scripts/release-binary.sh)
objcopy --only-keep-debug "$bin" "$bin.debug" 2>/dev/null || true
install -m 0755 "$bin" "$r/rootfs/usr/local/bin/ferry"
strip --strip-all "$r/rootfs/usr/local/bin/ferry" 2>/dev/null || true
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$r/rootfs/etc/ssl/certs/"
else
    echo "warning: no /etc/ssl/certs/ca-certificates.crt on this host; image has no CA bundle" >&2
fi
printf 'root:x:0:0:root:/:/sbin/nologin\nferry:x:10001:10001:ferry:/data:/sbin/nologin\n' >"$r/rootfs/etc/passwd"
printf 'root:x:0:\nferry:x:10001:\n' >"$r/rootfs/etc/group"
chmod 1777 "$r/rootfs/tmp"
cp docker/Dockerfile.scratch "$r/Dockerfile"
echo "== image $image"
build() { # quietly (the legacy builder's deprecation notice), but show errors
    docker build -q "$@" >"$ctx/build.log" 2>&1 || { cat "$ctx/build.log" >&2; return 1; }
}
build -t "$image" "$r"

# --- ferry-playground:dev (ferry:dev + static busybox + scripts)
if [[ ! -x $busybox ]] && command -v apt-get >/dev/null; then
    echo "== installing busybox-static (Debian) for the playground image"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
fi
if ! is_static "$busybox"; then
    echo "error: $busybox is not static (install busybox-static)" >&2
    exit 1
fi
p=$ctx/playground
mkdir -p "$p/bin"
install -m 0755 "$busybox" "$p/bin/busybox"
for a in $("$p/bin/busybox" --list); do
    [[ $a == busybox || -e $p/bin/$a ]] || ln -s busybox "$p/bin/$a"
done
cp docker/make-certs.sh docker/writer.sh "$p/"
cp docker/Dockerfile.playground "$p/Dockerfile"
echo "== image $playground"
build --build-arg FERRY_IMAGE="$image" -t "$playground" "$p"

for id in $old_ids; do
    [[ $id == "$(docker image inspect -f '{{.Id}}' "$image")" || $id == "$(docker image inspect -f '{{.Id}}' "$playground")" ]] ||
        docker rmi "$id" >/dev/null 2>&1 || true
done

size() { docker image inspect -f '{{.Size}}' "$1" | awk '{ printf "%.1f MB (%d bytes)", $1 / 1e6, $1 }'; }
echo "== built $image: $(size "$image"); $playground: $(size "$playground")"
