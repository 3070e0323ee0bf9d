#!/usr/bin/env bash
# deps.sh installs what firkin-worker needs at run and test time on Debian/Ubuntu:
# QEMU (x86 and arm), qemu-img, static busybox, e2fsprogs (mkfs.ext4, debugfs),
# cpio, nftables (guest egress rules) and dpkg-dev tools used by the image
# builder. Idempotent: apt-get runs (after an update) only when something is
# missing. Run it as root.
#
#   scripts/deps.sh            # everything (amd64 and arm64 guests)
#   scripts/deps.sh --no-arm   # skip qemu-system-arm
set -euo pipefail

want_arm=1
for a in "$@"; do
	case "$a" in
	--no-arm) want_arm=0 ;;
	-h | --help)
		sed -n '2,9p' "$0"
		exit 0
		;;
	*)
		echo "deps.sh: unknown argument $a" >&2
		exit 2
		;;
	esac
done

# package:command that proves it is installed
checks=(
	"qemu-system-x86:qemu-system-x86_64"
	"qemu-utils:qemu-img"
	"busybox-static:"
	"e2fsprogs:mkfs.ext4"
	"e2fsprogs:debugfs"
	"cpio:cpio"
	"file:file"
	"nftables:nft"
	"iproute2:ip"
)
if [ "$want_arm" = 1 ]; then
	checks+=("qemu-system-arm:qemu-system-aarch64")
fi

installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

missing=()
for c in "${checks[@]}"; do
	pkg=${c%%:*}
	cmd=${c#*:}
	if ! installed "$pkg"; then
		missing+=("$pkg")
	elif [ -n "$cmd" ] && ! PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null; then
		missing+=("$pkg")
	fi
done
# busybox-static must provide a static /bin/busybox (the dynamic "busybox"
# package conflicts with it).
if installed busybox-static && ! [ -x /bin/busybox ]; then
	missing+=("busybox-static")
fi

# The image builder takes arm64 guests' kernel and busybox from Debian's arm64
# packages, so dpkg must know the architecture (the builder adds it on demand
# too; doing it here keeps the apt-get update out of the tests).
need_arch=0
if [ "$want_arm" = 1 ] && [ "$(dpkg --print-architecture)" != arm64 ] &&
	! dpkg --print-foreign-architectures | grep -qx arm64; then
	need_arch=1
fi

if [ "${#missing[@]}" -eq 0 ] && [ "$need_arch" = 0 ]; then
	echo "deps.sh: all dependencies present"
	exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
	what="${missing[*]:-}"
	if [ "$need_arch" = 1 ]; then what="${what:+$what, }dpkg architecture arm64"; fi
	echo "deps.sh: missing: $what; run as root (sudo $0)" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ "$need_arch" = 1 ]; then
	echo "deps.sh: dpkg --add-architecture arm64"
	dpkg --add-architecture arm64
fi
if [ "${#missing[@]}" -eq 0 ]; then
	echo "deps.sh: apt-get update (for arm64 package lists)"
	apt-get -q update
	echo "deps.sh: done"
	exit 0
fi
# unique, order kept
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++')

echo "deps.sh: missing: ${missing[*]}"
echo "deps.sh: apt-get update"
apt-get -q update
echo "deps.sh: apt-get install ${missing[*]}"
apt-get -q install -y --no-install-recommends "${missing[@]}"
echo "deps.sh: done"
