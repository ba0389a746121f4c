#!/bin/bash
# make-guest.sh — build the tiny colo test guest: a Debian 12 cloud kernel and
# a busybox initramfs (see integration/guest/init for the guest's contracts).
#
# Output, in ${COLO_CACHE:-/var/cache/colo}/guest/:
#   vmlinuz      kernel (from linux-image-<ver>-cloud-amd64, never installed)
#   initrd.img   gzip'd newc cpio: static busybox, virtio modules, /init
#   stamp        hash of this script + integration/guest/* + package versions
#   info         kernel package/version and module load order (informational)
#   pkgs/        the downloaded kernel .deb
# Idempotent: with nothing changed it prints "guest: cached at <dir>".
#
# Boot it with e.g.:
#   qemu-system-x86_64 -machine pc,accel=tcg -m 128 -smp 1 -nodefaults \
#     -display none -L /usr/share/qemu -L /usr/share/seabios \
#     -kernel vmlinuz -initrd initrd.img \
#     -append 'console=ttyS0 quiet panic=-1 no_timer_check colo_ip=10.0.2.15/24 colo_load=0' \
#     -serial file:serial.log \
#     -drive if=none,id=d0,file=disk.raw,format=raw -device virtio-blk-pci,drive=d0 \
#     -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF=$HERE/$(basename "${BASH_SOURCE[0]}")
GUEST_SRC=$HERE/guest
CACHE=${COLO_CACHE:-/var/cache/colo}
OUT=$CACHE/guest
KMETA=linux-image-cloud-amd64
# Modules we want; their dependencies are resolved from the .ko files.
WANT_MODULES=(virtio_pci virtio_net virtio_blk)
BUSYBOX=/bin/busybox

log() { echo "guest: $*" >&2; }
die() { echo "guest: ERROR: $*" >&2; exit 1; }

APT_OPTS=(-o DPkg::Lock::Timeout=300 -o APT::Sandbox::User=root)

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

apt_updated=0
apt_update() {
	[ $apt_updated = 1 ] && return 0
	log "apt-get update"
	apt-get "${APT_OPTS[@]}" update -qq >&2
	apt_updated=1
}

# --- tools this script needs -------------------------------------------------
need_pkgs=()
pkg_installed busybox-static || need_pkgs+=(busybox-static)
command -v cpio >/dev/null || need_pkgs+=(cpio)
command -v gzip >/dev/null || need_pkgs+=(gzip)
apt_install() {
	log "installing $*"
	apt_update
	DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y -q \
		--no-install-recommends "$@" >&2
}
ensure_tool() { # $1 = command, $2 = package (only installed when needed)
	command -v "$1" >/dev/null || apt_install "$2"
}
[ ${#need_pkgs[@]} = 0 ] || apt_install "${need_pkgs[@]}"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing after installing busybox-static"
for t in apt-cache apt-get dpkg-deb dpkg-query flock sha256sum cpio gzip find sort; do
	command -v "$t" >/dev/null || die "missing tool: $t"
done
[ -f "$GUEST_SRC/init" ] || die "missing $GUEST_SRC/init"

mkdir -p "$OUT/pkgs"
exec 9>"$OUT/.lock"
flock 9

# --- which kernel ------------------------------------------------------------
resolve_kpkg() {
	apt-cache depends "$KMETA" 2>/dev/null |
		awk '!f && $1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; f = 1 }'
}
kpkg=$(resolve_kpkg || true)
if [ -z "$kpkg" ]; then
	apt_update || true
	kpkg=$(resolve_kpkg || true)
fi
kpkg_ver=
if [ -n "$kpkg" ]; then
	kpkg_ver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '!f && $1 == "Candidate:" { print $2; f = 1 }')
	[ "$kpkg_ver" != "(none)" ] || kpkg_ver=
fi
if [ -z "$kpkg" ] || [ -z "$kpkg_ver" ]; then
	# Offline / no apt lists: keep using a previous build if there is one.
	if [ -f "$OUT/info" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
		kpkg=$(awk -F= '$1 == "kernel_pkg" { print $2 }' "$OUT/info")
		kpkg_ver=$(awk -F= '$1 == "kernel_pkg_version" { print $2 }' "$OUT/info")
		log "WARNING: cannot resolve $KMETA with apt-cache; using cached $kpkg $kpkg_ver"
	else
		die "cannot resolve $KMETA (apt-cache depends) — is Debian's apt reachable?"
	fi
fi
bb_ver=$(dpkg-query -W -f='${Version}' busybox-static)

# --- stamp -------------------------------------------------------------------
stamp=$(
	{
		echo "kernel=$kpkg=$kpkg_ver"
		echo "busybox-static=$bb_ver"
		echo "modules=${WANT_MODULES[*]}"
		sha256sum "$SELF" | awk '{ print $1 "  make-guest.sh" }'
		(cd "$GUEST_SRC" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
	} | sha256sum | awk '{ print $1 }'
)
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] &&
	[ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
	echo "guest: cached at $OUT ($kpkg $kpkg_ver)"
	exit 0
fi

# --- fetch and unpack the kernel package (never installed on the host) -------
find_deb() {
	local f
	for f in "$OUT/pkgs/${kpkg}"_*.deb; do
		[ -f "$f" ] || continue
		if [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$kpkg" ] &&
			[ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$kpkg_ver" ]; then
			echo "$f"
			return 0
		fi
	done
	return 1
}
deb=$(find_deb || true)
if [ -z "$deb" ]; then
	log "downloading $kpkg=$kpkg_ver"
	(cd "$OUT/pkgs" && apt-get "${APT_OPTS[@]}" download -q "$kpkg=$kpkg_ver" >&2) || {
		apt_update
		(cd "$OUT/pkgs" && apt-get "${APT_OPTS[@]}" download -q "$kpkg=$kpkg_ver" >&2)
	}
	deb=$(find_deb) || die "downloaded $kpkg but cannot find ${kpkg}_*.deb with version $kpkg_ver"
fi

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/colo-guest.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$SCRATCH/kpkg"

kvers=()
for d in "$SCRATCH/kpkg/lib/modules"/*/; do
	[ -d "$d" ] && kvers+=("$(basename "$d")")
done
[ ${#kvers[@]} = 1 ] || die "expected one lib/modules/<ver> in $deb, found: ${kvers[*]:-none}"
kver=${kvers[0]}
KMOD=$SCRATCH/kpkg/lib/modules/$kver
[ -f "$SCRATCH/kpkg/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $deb"
cfg=$SCRATCH/kpkg/boot/config-$kver
if [ -f "$cfg" ]; then
	grep -q '^CONFIG_RD_GZIP=y' "$cfg" || die "kernel $kver lacks CONFIG_RD_GZIP"
	grep -q '^CONFIG_DEVTMPFS=y' "$cfg" || die "kernel $kver lacks CONFIG_DEVTMPFS"
fi

# --- kernel modules: resolve deps from each module's .modinfo ----------------
declare -A MODPATH=() MODDONE=() BUILTIN=()
while IFS= read -r -d '' f; do
	b=$(basename "$f")
	b=${b%%.ko*}
	MODPATH[${b//-/_}]=$f
done < <(find "$KMOD/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
if [ -f "$KMOD/modules.builtin" ]; then
	while read -r b; do
		b=${b##*/}
		b=${b%%.ko*}
		BUILTIN[${b//-/_}]=1
	done <"$KMOD/modules.builtin"
fi

modinfo_field() { # $1 = .ko file, $2 = field; prints the first value
	local v
	v=$(tr '\0' '\n' <"$1" | sed -n "s/^$2=//p")
	printf '%s\n' "${v%%$'\n'*}"
}

mkdir -p "$SCRATCH/mods"
ORDER=()
add_module() { # $1 = module name; appends it after its dependencies
	local m=${1//-/_} src dst deps d vm
	[ -z "${MODDONE[$m]:-}" ] || return 0
	MODDONE[$m]=1
	[ -z "${BUILTIN[$m]:-}" ] || return 0
	src=${MODPATH[$m]:-}
	[ -n "$src" ] || die "module $m not found under $KMOD/kernel"
	dst=$SCRATCH/mods/$m.ko
	case $src in
	*.ko.xz) ensure_tool xz xz-utils && xz -dc "$src" >"$dst" ;;
	*.ko.zst) ensure_tool zstd zstd && zstd -q -dc "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*) cp "$src" "$dst" ;;
	esac
	vm=$(modinfo_field "$dst" vermagic)
	case $vm in "$kver "*) ;; *) die "module $m vermagic '$vm' does not match $kver" ;; esac
	deps=$(modinfo_field "$dst" depends)
	for d in ${deps//,/ }; do
		add_module "$d"
	done
	ORDER+=("$m")
}
for m in "${WANT_MODULES[@]}"; do
	add_module "$m"
done
log "kernel $kver, modules: ${ORDER[*]}"

# --- initramfs tree ----------------------------------------------------------
R=$SCRATCH/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib/colo,dev,proc,sys,tmp,run,www,etc,root} \
	"$R/lib/modules/$kver"
cp "$BUSYBOX" "$R/bin/busybox"
chmod 755 "$R/bin/busybox"
"$BUSYBOX" --list-full | while read -r a; do
	case $a in */busybox | "") continue ;; */*) ;; *) a=bin/$a ;; esac
	[ -e "$R/$a" ] || [ -L "$R/$a" ] && continue
	mkdir -p "$R/${a%/*}"
	ln -s /bin/busybox "$R/$a"
done
[ -L "$R/bin/sh" ] || ln -sf busybox "$R/bin/sh"
for m in "${ORDER[@]}"; do
	cp "$SCRATCH/mods/$m.ko" "$R/lib/modules/$kver/$m.ko"
done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/colo-modules"
echo "$kver" >"$R/lib/modules/colo-kver"
install -m 755 "$GUEST_SRC/init" "$R/init"
for f in "$GUEST_SRC"/*; do
	[ -f "$f" ] || continue
	case $(basename "$f") in init) continue ;; esac
	install -m 755 "$f" "$R/usr/lib/colo/$(basename "$f")"
done
# /dev/console for the kernel to open before /init runs (the kernel's built-in
# initramfs has one too; this is belt and braces, skipped if mknod is refused).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "note: mknod /dev/console refused, relying on the kernel's built-in one"
mknod -m 666 "$R/dev/null" c 1 3 2>/dev/null || true
# deterministic mtimes
find "$R" -exec touch -h -d @0 {} +

(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) |
	gzip -9 -n >"$SCRATCH/initrd.img"
cp "$SCRATCH/kpkg/boot/vmlinuz-$kver" "$SCRATCH/vmlinuz"

{
	echo "kernel_pkg=$kpkg"
	echo "kernel_pkg_version=$kpkg_ver"
	echo "kernel_release=$kver"
	echo "busybox_static_version=$bb_ver"
	echo "modules=${ORDER[*]}"
} >"$SCRATCH/info"

# --- install atomically; the stamp goes last --------------------------------
rm -f "$OUT/stamp"
for f in vmlinuz initrd.img info; do
	cp "$SCRATCH/$f" "$OUT/.$f.new"
	mv -f "$OUT/.$f.new" "$OUT/$f"
done
echo "$stamp" >"$OUT/.stamp.new"
mv -f "$OUT/.stamp.new" "$OUT/stamp"
# keep only the kernel package in use
for f in "$OUT/pkgs"/*.deb; do
	[ -f "$f" ] && [ "$f" != "$deb" ] && rm -f "$f"
done
echo "guest: built at $OUT ($kpkg $kpkg_ver, kernel $kver, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
