#!/usr/bin/env bash
# Prepare a Debian 12 (bookworm) machine for the integration tests, as root:
#   1. derive a bookworm-backports apt entry (deb + deb-src) from the machine's
#      own Debian sources (no mirror name is written by this script),
#   2. install the packages the tests and the QEMU build need (QEMU 10.0.2
#      from bookworm-backports, the rest from bookworm),
#   3. build the patched QEMU (integration/build-qemu.sh) and the test guest
#      (integration/make-guest.sh).
# Everything built goes to $COLO_CACHE (default /var/cache/colo), outside the
# clone. Idempotent: a second run touches neither apt nor the build.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export COLO_CACHE=${COLO_CACHE:-/var/cache/colo}

BACKPORTS_SOURCES=/etc/apt/sources.list.d/colo-backports.sources
DEBIAN_SOURCES=/etc/apt/sources.list.d/debian.sources
LEGACY_SOURCES=/etc/apt/sources.list

# Installed together from bookworm-backports (10.0.2). Never let plain
# bookworm's qemu-system-x86 7.2 in: installing it removes qemu-utils 10.0.2.
BACKPORTS_PACKAGES=(qemu-system-x86 qemu-system-data qemu-utils)
BACKPORTS_MIN_VERSION='1:10.0.2~'
# From bookworm.
#   guest and network namespaces: busybox-static cpio xz-utils iproute2
#   QEMU build: gcc libc6-dev make patch pkg-config ninja-build flex bison
#     python3-venv libglib2.0-dev zlib1g-dev libpixman-1-dev libfdt-dev
#     libslirp-dev libgnutls28-dev (TLS for migration and NBD: docs/security.md),
#     curl ca-certificates (tarball download, PyPI)
#   tests: libnbd-bin (nbdinfo), g++ (libFuzzer, built by the fuzz targets), openssl
#     (an operator's own CA in colo-tls's tests; a TLS stranger on the bed)
#   workload suite (colo-testbed bench): apache2-utils (ApacheBench, `ab`), gnuplot-nox
#     (its PNG plots; the suite still writes its CSVs without it)
#   HA cluster on the bed: corosync corosync-qnetd corosync-qdevice (runtime),
#     libcpg-dev libvotequorum-dev libquorum-dev libcmap-dev libcfg-dev (the crate
#     rust-corosync links them)
BOOKWORM_PACKAGES=(
    busybox-static cpio xz-utils iproute2
    gcc libc6-dev make patch pkg-config ninja-build flex bison python3-venv
    libglib2.0-dev zlib1g-dev libpixman-1-dev libfdt-dev libslirp-dev libgnutls28-dev
    curl ca-certificates
    libnbd-bin g++ openssl apache2-utils gnuplot-nox
    corosync corosync-qnetd corosync-qdevice
    libcpg-dev libvotequorum-dev libquorum-dev libcmap-dev libcfg-dev
    pacemaker pacemaker-cli-utils resource-agents libxml2-utils  # Pacemaker on the bed, ocf-tester (xmllint)
)
APT_INSTALL=(apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300)

log_msg() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
summary=()

[[ $(id -u) -eq 0 ]] || die "must run as root (it writes $BACKPORTS_SOURCES, installs packages and writes $COLO_CACHE); try: sudo $0"
. /etc/os-release
[[ ${ID:-} == debian && ${VERSION_CODENAME:-} == bookworm ]] \
    || die "this script supports Debian 12 (bookworm) only; found ${PRETTY_NAME:-unknown}"
t_all=$(now)

# ------------------------------------------------------- 1. backports entry
t=$(now)
derive_from_deb822() {
    # The stanza whose Suites include plain "bookworm" (not -security), with
    # Suites and Types replaced; URIs, Components, Signed-By are copied.
    awk 'BEGIN { RS = ""; ORS = "\n\n" }
         /Suites:[^\n]*(^|[ \t])bookworm([ \t]|$|\n)/ && !/security/ {
             gsub(/Suites:[^\n]*/, "Suites: bookworm-backports")
             gsub(/Types:[^\n]*/, "Types: deb deb-src")
             print; exit
         }' "$DEBIAN_SOURCES"
}
derive_from_legacy() {
    # First "deb [options] URI bookworm components" line of sources.list.
    awk '$1 == "deb" {
             i = 2; opts = ""
             if ($i ~ /^\[/) {
                 while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } ; i++ }
             }
             if ($(i + 1) != "bookworm") next
             signed = ""
             if (match(opts, /signed-by=[^] ]+/))
                 signed = substr(opts, RSTART + 10, RLENGTH - 10)
             print "Types: deb deb-src"
             print "URIs: " $i
             print "Suites: bookworm-backports"
             print "Components: main"
             if (signed != "") print "Signed-By: " signed
             print ""
             exit
         }' "$LEGACY_SOURCES"
}

entry=''
if [[ -f $DEBIAN_SOURCES ]]; then
    entry=$(derive_from_deb822)
fi
if [[ -z $entry && -f $LEGACY_SOURCES ]]; then
    entry=$(derive_from_legacy)
fi
[[ -n $entry ]] || die "found no bookworm entry to derive bookworm-backports from in
  $DEBIAN_SOURCES (a deb822 stanza with 'Suites: bookworm ...') or
  $LEGACY_SOURCES (a 'deb <mirror> bookworm main' line).
  Write $BACKPORTS_SOURCES yourself (Types: deb deb-src, Suites: bookworm-backports)."
entry+=$'\n\n'   # same bytes as awk's ORS (command substitution ate it)

apt_updated=0
sources_state=unchanged
if [[ ! -f $BACKPORTS_SOURCES ]] || ! cmp -s <(printf '%s' "$entry") "$BACKPORTS_SOURCES"; then
    log_msg "writing $BACKPORTS_SOURCES"
    printf '%s' "$entry" >"$BACKPORTS_SOURCES.tmp"
    mv "$BACKPORTS_SOURCES.tmp" "$BACKPORTS_SOURCES"
    sources_state=written
    log_msg "apt-get update"
    apt-get update -q -o DPkg::Lock::Timeout=300
    apt_updated=1
fi
summary+=("apt sources ($sources_state): $(elapsed "$t")")

# -------------------------------------------------------------- 2. packages
t=$(now)
installed_version() { # prints the version if the package is fully installed
    local status
    status=$(dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null) || return 1
    [[ $status == 'ii '* ]] || return 1
    echo "${status#ii }" | sed 's/^ *//'
}
ensure_apt_index() {
    if [[ $apt_updated -eq 0 ]]; then
        log_msg "apt-get update"
        apt-get update -q -o DPkg::Lock::Timeout=300
        apt_updated=1
    fi
}

need_backports=0
for p in "${BACKPORTS_PACKAGES[@]}"; do
    v=$(installed_version "$p") || { need_backports=1; continue; }
    dpkg --compare-versions "$v" ge "$BACKPORTS_MIN_VERSION" || need_backports=1
done
missing=()
for p in "${BOOKWORM_PACKAGES[@]}"; do
    installed_version "$p" >/dev/null || missing+=("$p")
done

pkg_state=unchanged
export DEBIAN_FRONTEND=noninteractive
if [[ $need_backports -eq 1 ]]; then
    ensure_apt_index
    log_msg "installing from bookworm-backports: ${BACKPORTS_PACKAGES[*]}"
    "${APT_INSTALL[@]}" -t bookworm-backports "${BACKPORTS_PACKAGES[@]}"
    pkg_state=installed
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    ensure_apt_index
    log_msg "installing from bookworm: ${missing[*]}"
    "${APT_INSTALL[@]}" "${missing[@]}"
    pkg_state=installed
fi
for p in "${BACKPORTS_PACKAGES[@]}"; do
    v=$(installed_version "$p") || die "$p is not installed after apt-get install"
    dpkg --compare-versions "$v" ge "$BACKPORTS_MIN_VERSION" \
        || die "$p is $v, need >= $BACKPORTS_MIN_VERSION from bookworm-backports"
done
summary+=("packages ($pkg_state): $(elapsed "$t")")

# ------------------------------------------------------------ 3. QEMU, guest
t=$(now)
"$script_dir/build-qemu.sh"
summary+=("QEMU build: $(elapsed "$t")")

[[ -x $script_dir/make-guest.sh ]] || die "$script_dir/make-guest.sh is missing or not executable"
t=$(now)
"$script_dir/make-guest.sh"
guest_state="make-guest.sh: $(elapsed "$t")"
summary+=("$guest_state")

# ------------------------------------------------------------ 4. cargo-fuzz
# The fuzz targets (fuzz/, docs/fuzzing.md) run briefly in the test command. cargo-fuzz comes
# from crates.io, pinned by its own lock file (--locked); a few minutes the first time.
t=$(now)
if cargo fuzz --version >/dev/null 2>&1; then
    fuzz_state=present
else
    log_msg "installing cargo-fuzz (cargo install --locked)"
    cargo install --locked --quiet cargo-fuzz || die "cargo install cargo-fuzz failed"
    fuzz_state=installed
fi
summary+=("cargo-fuzz ($fuzz_state): $(elapsed "$t")")

# ---------------------------------------------------------------- summary
echo
echo "== colo integration setup done in $(elapsed "$t_all") =="
echo "QEMU (patched):  $COLO_CACHE/qemu/bin/qemu-system-x86_64"
echo "qemu-img:        $(command -v qemu-img) ($(installed_version qemu-utils))"
guest_files=$(find "$COLO_CACHE" -maxdepth 2 -path "$COLO_CACHE/guest*" -type f ! -name '.*' 2>/dev/null | sort)
if [[ -n $guest_files ]]; then
    echo "guest files:"
    sed 's/^/  /' <<<"$guest_files"
else
    echo "guest files:     none under $COLO_CACHE/guest* (see make-guest.sh)"
fi
echo "timings:"
printf '  %s\n' "${summary[@]}"
