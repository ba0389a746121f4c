#!/usr/bin/env bash
# Build the QEMU used by the integration tests: QEMU 10.0.2 from Debian's
# original source tarball plus integration/patches/*.patch, as a minimal
# x86_64-softmmu build installed to $COLO_CACHE/qemu. The patches:
#   qemu-10.0.2-colo.patch      the COLO state fix (upstream 0b5bf4ea76) and
#                               the TCG BQL fix; see docs/qemu-versions.md
#   qemu-10.0.2-ds-build.patch  lets meson configure the +ds tarball, which
#                               lacks the EDK2 firmware blobs
#
#   COLO_CACHE=/var/cache/colo   cache dir (tarball, venv, build tree, install)
#   JOBS=<n>                     parallel build jobs (default: nproc)
#   QEMU_ORIG_TARBALL=<file>     use this local qemu_10.0.2+ds.orig.tar.xz
#                                instead of downloading it (checked by sha256)
#
# Needs the packages integration/setup.sh installs and a deb-src entry for
# bookworm-backports (setup.sh writes it). Does nothing but print
# "QEMU: cached at ..." when the same tarball, patches and configure flags
# were already built and the binary exists.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
patch_dir="$script_dir/patches"

COLO_CACHE=${COLO_CACHE:-/var/cache/colo}
JOBS=${JOBS:-$(nproc)}

# The Debian source package whose orig tarball we build. Every Debian revision
# of 10.0.2+ds shares the same orig tarball, so another revision is accepted if
# this one has left the archive; the sha256 below pins the content the patches
# were written against.
QEMU_DEB_VERSION='1:10.0.2+ds-2+deb13u1~bpo12+1'
ORIG_NAME='qemu_10.0.2+ds.orig.tar.xz'
ORIG_SHA256='0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1'
SRC_DIRNAME='qemu-10.0.2'

src_cache="$COLO_CACHE/src"
build_root="$COLO_CACHE/build"
src_dir="$build_root/$SRC_DIRNAME"
prefix="$COLO_CACHE/qemu"
venv="$COLO_CACHE/venv"
log="$build_root/qemu-build.log"
stamp="$prefix/.colo-build-stamp"
built_stamp="$build_root/$SRC_DIRNAME.built"   # build tree complete
qemu_bin="$prefix/bin/qemu-system-x86_64"

# Configure flags. --without-default-features turns every optional feature
# off; what COLO and the tests need is switched back on explicitly:
#   tcg, kvm            accelerators (TCG on these machines, KVM where usable)
#   replication         COLO migration (x-colo, x-colo-lost-heartbeat,
#                       query-colo-status), block/replication.c, colo-compare
#   colo-proxy          colo-compare and filter-rewriter (filter-mirror and
#                       filter-redirector are always built)
#   vhost-user/-net/-kernel  vhost-user-net attachment of colo-proxyd and
#                       vhost=on for tap; cheap to build
#   pixman              display devices such as the default VGA of -machine pc
#   fdt=system          Debian's libfdt instead of the dtc subproject
#   slirp               -netdev user, for quick guest checks only (COLO
#                       tests use tap: connections inside slirp cannot
#                       survive a failover)
# Always built and relied on: quorum, nbd, raw, qcow2 block drivers, tap
# netdev, virtio-net/blk-pci, -kernel/-initrd, QMP with OOB, unix-socket
# migration, the "log" trace backend (-trace colo_*).
# Left off: tools (Debian's qemu-utils 10.0.2 provides qemu-img/-io/-nbd),
# docs, UIs (gtk/sdl/vnc/spice/curses), crypto libraries other than GnuTLS
# (--enable-gnutls: tls-creds-x509 for migration and NBD TLS), compression
# libraries, linux-aio/io_uring, seccomp, modules (one self-contained binary),
# debug info (the binary is stripped anyway; faster compile). The device set
# is QEMU's default for x86_64 (pc and q35 machines and their usual devices).
# --disable-download: never fetch subprojects; fail instead.
# --disable-install-blobs: the +ds tarball has no firmware blobs to install.
# --firmwarepath: Debian's own search path (qemu-system-data, seabios,
# ipxe-qemu), so the binary finds bios-256k.bin, linuxboot_dma.bin and
# efi-virtio.rom without -L. Passing -L /usr/share/qemu -L /usr/share/seabios
# is harmless but not needed; the checks at the end run without -L.
configure_flags=(
    --target-list=x86_64-softmmu
    --prefix="$prefix"
    --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
    --without-default-features
    --disable-download
    --disable-install-blobs
    --disable-werror
    --disable-debug-info
    --disable-docs
    --disable-tools
    --disable-user
    --disable-modules
    --enable-system
    --enable-tcg
    --enable-kvm
    --enable-replication
    --enable-colo-proxy
    --enable-vhost-user
    --enable-vhost-net
    --enable-vhost-kernel
    --enable-pixman
    --enable-fdt=system
    --enable-slirp
    --enable-gnutls
)

log_msg() { printf 'build-qemu: %s\n' "$*" >&2; }
die() { printf 'build-qemu: ERROR: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
timings=()
t_all=$(now)

sha256_of_patches() {
    local p
    for p in "${patches[@]}"; do sha256sum "$p" | cut -d' ' -f1; done \
        | sha256sum | cut -d' ' -f1
}

shopt -s nullglob
patches=("$patch_dir"/*.patch)
shopt -u nullglob
[[ ${#patches[@]} -gt 0 ]] || die "no patches in $patch_dir"

expected_stamp=$(printf 'tarball %s sha256:%s\npatches sha256:%s\nconfigure %s\n' \
    "$ORIG_NAME" "$ORIG_SHA256" "$(sha256_of_patches)" "${configure_flags[*]}")

if [[ -x $qemu_bin && -f $stamp ]] && [[ "$(cat "$stamp")" == "$expected_stamp" ]]; then
    echo "QEMU: cached at $qemu_bin"
    exit 0
fi

mkdir -p "$src_cache" "$build_root"

# One build at a time per cache dir: other sessions may run setup.sh too.
exec 9>"$COLO_CACHE/.build-qemu.lock"
if ! flock -n 9; then
    log_msg "another build-qemu.sh holds $COLO_CACHE/.build-qemu.lock; waiting"
    flock 9
    if [[ -x $qemu_bin && -f $stamp ]] && [[ "$(cat "$stamp")" == "$expected_stamp" ]]; then
        echo "QEMU: cached at $qemu_bin (built by the concurrent run)"
        exit 0
    fi
fi

for tool in curl tar xz patch python3 ninja pkg-config cc make strip flock; do
    command -v "$tool" >/dev/null || die "'$tool' not found; run integration/setup.sh (as root) first"
done

# ---------------------------------------------------------------- tarball
tarball="$src_cache/$ORIG_NAME"

hash_cmd_for() { # apt's hash name -> checksum tool
    case $1 in
        SHA512) echo sha512sum ;; SHA256) echo sha256sum ;;
        SHA1) echo sha1sum ;; MD5Sum|MD5) echo md5sum ;;
        *) return 1 ;;
    esac
}

# Prints "<url> <HASHNAME:hash>" for the orig tarball, from apt's deb-src
# index. Tries the pinned version first, then any other 10.0.2+ds revision.
find_orig_uri() {
    local versions v out
    versions=("$QEMU_DEB_VERSION")
    while read -r v; do
        [[ $v == "$QEMU_DEB_VERSION" ]] || versions+=("$v")
    done < <(apt-cache showsrc qemu 2>/dev/null \
        | awk '/^Version: .*10\.0\.2\+ds-/ { print $2 }' | sort -u)
    for v in "${versions[@]}"; do
        # apt-get source --print-uris also lists the .dsc and .debian.tar.xz;
        # only the orig tarball is used (the others may 404 on some mirrors).
        out=$(apt-get source --print-uris "qemu=$v" 2>/dev/null) || continue
        out=$(awk -v n="$ORIG_NAME" '$2 == n { gsub(/\047/, "", $1); print $1, $4; exit }' <<<"$out")
        if [[ -n $out ]]; then
            [[ $v == "$QEMU_DEB_VERSION" ]] || log_msg "using orig tarball of qemu $v"
            echo "$out"
            return 0
        fi
    done
    return 1
}

fetch_tarball() {
    local t url apt_hash hash_name hash_value hash_cmd got uri_line
    t=$(now)
    if [[ -n ${QEMU_ORIG_TARBALL:-} ]]; then
        [[ -f $QEMU_ORIG_TARBALL ]] || die "QEMU_ORIG_TARBALL=$QEMU_ORIG_TARBALL does not exist"
        if [[ $(realpath "$QEMU_ORIG_TARBALL") != $(realpath -m "$tarball") ]]; then
            cp "$QEMU_ORIG_TARBALL" "$tarball.part"
            mv "$tarball.part" "$tarball"
        fi
    fi
    if [[ -f $tarball ]] && [[ $(sha256sum "$tarball" | cut -d' ' -f1) == "$ORIG_SHA256" ]]; then
        log_msg "tarball: $tarball (already downloaded)"
    else
        rm -f "$tarball"
        uri_line=$(find_orig_uri) || die "apt knows no source for qemu $QEMU_DEB_VERSION.
      The orig tarball URL comes from the bookworm-backports deb-src index: run
      integration/setup.sh (it writes /etc/apt/sources.list.d/colo-backports.sources
      with 'Types: deb deb-src' and runs apt-get update), or download $ORIG_NAME
      (sha256 $ORIG_SHA256) yourself and set QEMU_ORIG_TARBALL=/path/to/it."
        read -r url apt_hash <<<"$uri_line"
        hash_name=${apt_hash%%:*}
        hash_value=${apt_hash#*:}
        hash_cmd=$(hash_cmd_for "$hash_name") || die "apt printed an unknown checksum type '$hash_name' for $url"
        log_msg "downloading $url"
        curl -fL --retry 5 --retry-delay 3 --retry-connrefused --connect-timeout 30 \
            -sS -o "$tarball.part" "$url" || die "download of $url failed"
        got=$($hash_cmd "$tarball.part" | cut -d' ' -f1)
        [[ $got == "$hash_value" ]] || { rm -f "$tarball.part"; die "$hash_name mismatch for $url: apt says $hash_value, got $got"; }
        got=$(sha256sum "$tarball.part" | cut -d' ' -f1)
        [[ $got == "$ORIG_SHA256" ]] || { rm -f "$tarball.part"; die "$ORIG_NAME has sha256 $got, expected $ORIG_SHA256 (the patches were written against that tarball)"; }
        mv "$tarball.part" "$tarball"
        log_msg "tarball: $tarball ($hash_name verified against apt, sha256 pinned)"
    fi
    timings+=("tarball $(elapsed "$t")")
}

# ------------------------------------------------------------ extract+patch
extract_and_patch() {
    local t p rejects
    t=$(now)
    rm -rf "$src_dir" "$built_stamp"
    tar -C "$build_root" -xf "$tarball"
    [[ -d $src_dir ]] || die "tarball did not contain $SRC_DIRNAME/"
    for p in "${patches[@]}"; do
        log_msg "applying $(basename "$p")"
        if ! patch -d "$src_dir" -p1 --forward --batch --fuzz=0 --no-backup-if-mismatch <"$p"; then
            die "patch $p does not apply cleanly to $ORIG_NAME (see the FAILED hunks above)"
        fi
    done
    rejects=$(find "$src_dir" -name '*.rej' | head -n 5)
    [[ -z $rejects ]] || die "patch left rejects: $rejects"
    timings+=("extract+patch $(elapsed "$t")")
}

# ------------------------------------------------------------------ venv
# The +ds tarball has no python/wheels/, so configure cannot install its
# bundled meson. It builds its own pyvenv nested on top of the interpreter
# given with --python and uses the meson found there (needs >= 1.5.0).
venv_ok() {
    [[ -x $venv/bin/python3 ]] && "$venv/bin/python3" - <<'EOF' 2>/dev/null
import importlib.metadata as md
v = tuple(int(x) for x in md.version("meson").split(".")[:2])
assert (1, 5) <= v < (1, 8)
assert md.version("pycotap") == "1.3.1"
EOF
}
ensure_venv() {
    local t
    t=$(now)
    if ! venv_ok; then
        log_msg "creating python venv $venv (meson<1.8, pycotap 1.3.1 from PyPI)"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check 'meson>=1.5,<1.8' 'pycotap==1.3.1'
        venv_ok || die "venv $venv lacks a usable meson/pycotap after pip install"
    fi
    export PATH="$venv/bin:$PATH"
    timings+=("venv $(elapsed "$t")")
}

# ------------------------------------------------------- configure+build
run_logged() { # run a build step, output only to the log; tail it on failure
    local what=$1; shift
    if ! "$@" >>"$log" 2>&1; then
        echo "---- last 40 lines of $log ----" >&2
        tail -n 40 "$log" >&2
        die "$what failed (full log: $log)"
    fi
}

configure_and_build() {
    local t steps
    : >"$log"
    t=$(now)
    mkdir -p "$src_dir/build"
    log_msg "configure (log: $log)"
    (cd "$src_dir/build" && run_logged configure \
        ../configure --python="$venv/bin/python3" "${configure_flags[@]}")
    timings+=("configure $(elapsed "$t")")

    t=$(now)
    steps=$(ninja -C "$src_dir/build" -n qemu-system-x86_64 2>/dev/null | grep -c '^\[' || true)
    log_msg "building qemu-system-x86_64 with $JOBS jobs (~$steps steps)"
    run_logged "build" ninja -C "$src_dir/build" -j"$JOBS" qemu-system-x86_64
    timings+=("build $(elapsed "$t")")
    printf '%s\n' "$expected_stamp" >"$built_stamp"
}

if [[ -x $src_dir/build/qemu-system-x86_64 && -f $built_stamp ]] \
    && [[ "$(cat "$built_stamp")" == "$expected_stamp" ]]; then
    # An earlier run built this but did not finish installing/verifying.
    log_msg "build tree $src_dir is complete; installing and verifying only"
else
    fetch_tarball
    extract_and_patch
    ensure_venv
    configure_and_build
fi

# Only the emulator is installed: firmware and option ROMs come from Debian's
# packages via --firmwarepath; tools come from qemu-utils.
rm -rf "$prefix"
install -D -m 0755 "$src_dir/build/qemu-system-x86_64" "$qemu_bin"
strip "$qemu_bin"

# ------------------------------------------------------------------ verify
t=$(now)
fail_verify() { die "verification of $qemu_bin failed: $*"; }

grep -A3 'if (migrate_colo() && s->state == MIGRATION_STATUS_DEVICE)' \
    "$src_dir/migration/migration.c" | grep -q 'migrate_set_state(&s->state, MIGRATION_STATUS_DEVICE,' \
    || fail_verify "COLO state fix not found in migration/migration.c"
grep -B1 -A1 'qemu_savevm_live_state(s->to_dst_file);' "$src_dir/migration/colo.c" \
    | tr -d ' \n' | grep -q 'bql_lock();qemu_savevm_live_state(s->to_dst_file);bql_unlock();' \
    || fail_verify "BQL fix not found in migration/colo.c"
"$src_dir/build/qemu-system-x86_64" --version >/dev/null   # unstripped twin runs too

version=$("$qemu_bin" --version | head -n 1)
[[ $version == *" 10.0.2"* ]] || fail_verify "unexpected --version: $version"

for obj in colo-compare filter-mirror filter-redirector filter-rewriter iothread; do
    "$qemu_bin" -object "$obj,help" >/dev/null 2>&1 || fail_verify "-object $obj,help"
done
for dev in virtio-net-pci virtio-blk-pci; do
    "$qemu_bin" -device "$dev,help" >/dev/null 2>&1 || fail_verify "-device $dev,help"
done
formats=$("$qemu_bin" -machine none -display none -drive format=help 2>&1 | head -n 1)
for fmt in raw qcow2 nbd quorum replication; do
    [[ " ${formats#*:} " == *" $fmt "* ]] || fail_verify "block driver $fmt missing ($formats)"
done
netdevs=$("$qemu_bin" -netdev help 2>&1)
for nd in tap vhost-user; do
    grep -qx "$nd" <<<"$netdevs" || fail_verify "netdev $nd missing"
done

# Start a pc machine (no -L: firmware must be found through --firmwarepath)
# with the devices the tests use; over QMP: negotiate OOB, run an exec-oob
# command, ask for COLO status, the x-colo capability and the COLO QOM types.
# (A QMP script on stdin is unreliable: QEMU drops queued commands at EOF.)
kernel_args=()
kernel=$(ls /boot/vmlinuz-* "$COLO_CACHE/guest/vmlinuz" 2>/dev/null | head -n 1 || true)
[[ -n $kernel && -r $kernel ]] && kernel_args=(-kernel "$kernel")
smoke_dir=$(mktemp -d)
trap 'rm -rf "$smoke_dir"' EXIT
if ! timeout 120 python3 - "$smoke_dir/qmp.sock" "$smoke_dir/stderr" "$qemu_bin" \
    -machine pc -accel tcg -m 64 -nodefaults -display none -S \
    -netdev hubport,id=n0,hubid=0 -device virtio-net-pci,netdev=n0 \
    -drive if=none,id=d0,driver=null-co -device virtio-blk-pci,drive=d0 \
    "${kernel_args[@]}" <<'EOF'
import json, signal, socket, subprocess, sys, time

sock_path, stderr_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
qemu = subprocess.Popen(argv + ["-qmp", f"unix:{sock_path},server=on,wait=on"],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=open(stderr_path, "w"))

def fail(msg):
    qemu.kill()
    sys.exit(f"{msg}\nQEMU stderr: {open(stderr_path).read().strip()}")

signal.signal(signal.SIGTERM, lambda *_: fail("timed out"))

sock = None
for _ in range(300):
    if qemu.poll() is not None:
        fail(f"QEMU exited with status {qemu.returncode} before QMP was up")
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(sock_path)
        break
    except OSError:
        sock = None
        time.sleep(0.1)
if sock is None:
    fail("QMP socket never came up")
f = sock.makefile("rw")

def reply(msg, want_id=None):
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        line = f.readline()
        if not line:
            fail(f"QMP closed while waiting for a reply to {msg}")
        r = json.loads(line)
        if "event" in r or (want_id is not None and r.get("id") != want_id):
            continue
        if "error" in r:
            fail(f"{msg} -> {r['error']}")
        return r["return"]

greeting = json.loads(f.readline())
if "oob" not in greeting["QMP"]["capabilities"]:
    fail(f"QMP does not offer OOB: {greeting}")
reply({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
reply({"exec-oob": "yank", "arguments": {"instances": []}, "id": "oob1"}, "oob1")
status = reply({"execute": "query-colo-status"})
if status.get("mode") != "none":
    fail(f"query-colo-status: {status}")
caps = {c["capability"] for c in reply({"execute": "query-migrate-capabilities"})}
for cap in ("x-colo", "return-path"):
    if cap not in caps:
        fail(f"migration capability {cap} missing")
types = {t["name"] for t in reply({"execute": "qom-list-types"})}
for t in ("colo-compare", "filter-mirror", "filter-redirector", "filter-rewriter",
          "virtio-net-pci", "virtio-blk-pci", "iothread"):
    if t not in types:
        fail(f"QOM type {t} missing")
if reply({"execute": "query-status"}).get("status") != "prelaunch":
    fail("machine is not in prelaunch")
reply({"execute": "quit"})
try:
    qemu.wait(timeout=30)
except subprocess.TimeoutExpired:
    fail("QEMU did not quit")
EOF
then
    fail_verify "QMP smoke test (see above)"
fi
log_msg "verified: COLO objects, block drivers, netdevs; pc machine with virtio-net/blk${kernel:+ and -kernel $kernel} started without -L; QMP OOB, x-colo, query-colo-status"
timings+=("verify $(elapsed "$t")")

printf '%s\n' "$expected_stamp" >"$stamp"

echo "QEMU: ready, $version"
echo "QEMU: installed at $qemu_bin ($(du -h "$qemu_bin" | cut -f1), stripped)"
echo "QEMU: build log $log"
echo "QEMU: timings: ${timings[*]}; total $(elapsed "$t_all")"
