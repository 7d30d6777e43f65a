#!/usr/bin/env bash
# Builds the disk-image pair for the codec benchmark, cached under /work/main/.cache/codec/:
#   base.raw   a 2 GiB raw ext4 image holding a Debian bookworm system made by debootstrap
#   extra.raw  the same image after `apt-get install` of extra packages inside it
# The second image is made by copying the first and installing into the copy (loop mount), so the
# base's blocks stay where they were, as they would on a real VM disk that evolved. When loop
# mounts are not allowed, it falls back to installing into a copy of the root directory and
# building a fresh ext4 image from it with `mkfs.ext4 -d` (file data then moves to new blocks, a
# harder case for block-level dedup; the script prints which path it took).
#
# Needs root, debootstrap, e2fsprogs and access to http://deb.debian.org/debian.
# Usage: bench/codec/make-debian-images.sh [cache-dir]
set -euo pipefail

cache_dir="${1:-$(cd "$(dirname "$0")/../.." && pwd)/.cache/codec}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="${DEBIAN_SUITE:-bookworm}"
image_size="${IMAGE_SIZE:-2G}"
extra_packages="${EXTRA_PACKAGES:-python3 curl git less vim-tiny openssh-client}"

mkdir -p "$cache_dir"
cd "$cache_dir"

if [[ -f base.raw && -f extra.raw ]]; then
    echo "images already built in $cache_dir"
    ls -ls base.raw extra.raw
    exit 0
fi

if [[ ! -f rootfs-base/.debootstrap-done ]]; then
    rm -rf rootfs-base
    echo "debootstrap $suite into $cache_dir/rootfs-base"
    debootstrap --arch=amd64 "$suite" rootfs-base "$mirror"
    touch rootfs-base/.debootstrap-done
fi

if [[ ! -f base.raw ]]; then
    rm -f base.raw.tmp
    truncate -s "$image_size" base.raw.tmp
    mkfs.ext4 -q -F -L debian-root -d rootfs-base base.raw.tmp
    mv base.raw.tmp base.raw
fi

install_into() {
    local root="$1"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    mount --bind /proc "$root/proc"
    mount --bind /dev "$root/dev"
    local status=0
    chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
        bash -c "apt-get update && apt-get install -y --no-install-recommends $extra_packages && apt-get clean" \
        || status=$?
    umount "$root/dev"
    umount "$root/proc"
    return $status
}

rm -f extra.raw.tmp
cp --sparse=always base.raw extra.raw.tmp
mkdir -p mnt
if mount -o loop extra.raw.tmp mnt 2>/dev/null; then
    echo "installing extra packages in place (loop mount): $extra_packages"
    status=0
    install_into mnt || status=$?
    umount mnt
    [[ $status -eq 0 ]] || exit $status
else
    echo "loop mount refused; installing into a copy of the root directory and rebuilding with mkfs.ext4 -d"
    rm -rf rootfs-extra
    cp -a rootfs-base rootfs-extra
    install_into rootfs-extra
    rm -f extra.raw.tmp
    truncate -s "$image_size" extra.raw.tmp
    mkfs.ext4 -q -F -L debian-root -d rootfs-extra extra.raw.tmp
fi
mv extra.raw.tmp extra.raw
ls -ls base.raw extra.raw
