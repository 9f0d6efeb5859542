#!/usr/bin/env bash
# deploy/local/libs.sh — builds the client libraries pinned in deploy/local/libs.versions
# (librdkafka, hiredis with libhiredis_ssl, libmicrohttpd) once, into one install prefix in a
# cache outside the repo, and prints that prefix on stdout (everything else goes to stderr):
#
#     cmake -S . -B build -G Ninja -DCQRS_DEPS_PREFIX="$(deploy/local/libs.sh)"
#
# The prefix is ${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}/libs/prefix. CMake
# searches it first (also without -DCQRS_DEPS_PREFIX, when it exists) and refuses versions below
# the pins' minimums; the binaries load its libraries through their RPATH.
#
# Sources are Debian's source packages, from a deb-src entry for trixie and sid that this script
# adds (/etc/apt/sources.list.d/cqrs-deb-src.sources, signed by Debian's archive key). apt checks
# the signed Release file and the hash of every file it downloads; the orig tarball's SHA-256 is
# then compared with the .dsc and with the pin, and `dpkg-source -x` checks the .dsc's checksums
# once more while unpacking. The upstream sources are built with their own build systems (the
# Debian packaging of libmicrohttpd 1.0 needs a newer dpkg-dev than Debian 12 has); Debian's
# patches only concern its packaging and test suites, so they are left out (--skip-patches).
# Compiler and linker flags are Debian's (dpkg-buildflags: fortify, stack protector, relro, now).
#
# Idempotent. A stamp per library and version ($CACHE/libs/stamps/<package>-<version>) records
# the recipe it was built with and the files it installed: a library is rebuilt only when its
# pin or recipe changes, and the files of the build it replaces are removed first. A library the
# system already has at the minimum version (its pkg-config modules; hiredis on Debian 13 or
# Ubuntu 24.04) is not built. Build logs stay in $CACHE/libs/logs; a failed build keeps its tree
# in $CACHE/libs/build. Concurrent runs wait for each other.
#
# As root it installs what it needs with apt (the deb-src entry, the build dependencies); as
# another user it says what is missing. CQRS_LIBS_JOBS: parallel make jobs (default: nproc).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSIONS=$SCRIPT_DIR/libs.versions

CACHE_DIR=${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}
[[ $CACHE_DIR == /* ]] || CACHE_DIR=$PWD/$CACHE_DIR
LIBS=${CACHE_DIR%/}/libs
PREFIX=$LIBS/prefix
STAMPS=$LIBS/stamps
LOGS=$LIBS/logs
DOWNLOADS=$LIBS/sources
JOBS=${CQRS_LIBS_JOBS:-$(nproc)}

APT_SOURCES=/etc/apt/sources.list.d/cqrs-deb-src.sources
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
APT_OPTS=(-o DPkg::Lock::Timeout=600) # another apt run on the machine: wait for it

# How each library is built. An explicit --enable makes librdkafka's configure fail when a
# library is missing instead of building without the feature; SCRAM (SASL_SSL) comes with SSL,
# GSSAPI with libsasl2, OIDC with libcurl.
RDKAFKA_CONFIGURE=(--enable-ssl --enable-gssapi --enable-zstd --enable-zlib --enable-lz4-ext
    --enable-curl)
RDKAFKA_FEATURES=(WITH_SSL WITH_SASL_SCRAM WITH_SASL_CYRUS WITH_ZSTD WITH_ZLIB WITH_LZ4_EXT
    WITH_CURL WITH_OAUTHBEARER_OIDC)
HIREDIS_MAKE=(USE_SSL=1)
MHD_CONFIGURE=(--disable-static --enable-https=yes --with-gnutls --enable-epoll=yes
    --enable-poll=yes --enable-itc=eventfd --disable-doc --disable-examples --disable-tools
    --disable-curl)
# Bump when the recipe changes in a way the lines above do not show.
RECIPE_REV=1

log() { printf '[libs] %s\n' "$*" >&2; }

die() {
    printf '[libs] ERROR: %s\n' "$*" >&2
    exit 1
}

# die_log MESSAGE LOGFILE: fail with the end of a build log.
die_log() {
    printf '[libs] ERROR: %s\n' "$1" >&2
    if [[ -s $2 ]]; then
        printf '[libs] ---- last 40 lines of %s ----\n' "$2" >&2
        tail -n 40 "$2" >&2
        printf '[libs] ---- end of %s ----\n' "$2" >&2
    fi
    exit 1
}

is_root() { [[ $EUID -eq 0 ]]; }

# --------------------------------------------------------------- the pins ---

declare -A DEBVER MODULES MINIMUM SHA256
NAMES=()
while read -r name debver modules minimum sha256 rest; do
    [[ -z $name || $name == \#* ]] && continue
    [[ -n $sha256 && -z $rest ]] || die "$VERSIONS: malformed line for $name"
    NAMES+=("$name")
    DEBVER[$name]=$debver
    MODULES[$name]=${modules//,/ }
    MINIMUM[$name]=$minimum
    SHA256[$name]=$sha256
done <"$VERSIONS"

# 2.14.2-1 → 2.14.2 (no epoch, no Debian revision)
upstream_version() {
    local v=${DEBVER[$1]#*:}
    printf '%s\n' "${v%-*}"
}

# What a build is, as stored in its stamp: a change of any of it means a rebuild.
recipe() {
    local how
    case $1 in
    librdkafka) how="configure ${RDKAFKA_CONFIGURE[*]}" ;;
    hiredis) how="make ${HIREDIS_MAKE[*]}" ;;
    libmicrohttpd) how="configure ${MHD_CONFIGURE[*]}" ;;
    *) die "no recipe for $1" ;;
    esac
    printf '%s %s %s rev%s\n' "${DEBVER[$1]}" "${SHA256[$1]}" "$how" "$RECIPE_REV"
}

stamp_of() { printf '%s/%s-%s\n' "$STAMPS" "$1" "$(upstream_version "$1")"; }

# The system's own pkg-config modules (not the cache) are all at least the minimum.
system_has() {
    local m
    command -v pkg-config >/dev/null || return 1
    for m in ${MODULES[$1]}; do
        env -u PKG_CONFIG_PATH -u PKG_CONFIG_LIBDIR \
            pkg-config --atleast-version="${MINIMUM[$1]}" "$m" 2>/dev/null || return 1
    done
}

# Built before with the same recipe, and its pkg-config files are still in the prefix.
cached() {
    local stamp m
    stamp=$(stamp_of "$1")
    [[ -f $stamp && "$(head -n 1 "$stamp")" == "$(recipe "$1")" ]] || return 1
    for m in ${MODULES[$1]}; do
        [[ -f $PREFIX/lib/pkgconfig/$m.pc ]] || return 1
    done
}

# ---------------------------------------------------------- Debian's apt ---

# ensure_packages PKG...: installs the missing ones (root) or says which they are.
ensure_packages() {
    local p missing=()
    for p in "$@"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] ||
            missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if ! is_root; then
        log "missing Debian packages: ${missing[*]}"
        die "install them with: sudo apt-get install ${missing[*]}"
    fi
    log "installing: ${missing[*]} (log: $LOGS/apt.log)"
    mkdir -p "$LOGS"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}" \
        >"$LOGS/apt.log" 2>&1; then
        # a stale package index: refresh it once
        apt-get "${APT_OPTS[@]}" update -q >>"$LOGS/apt.log" 2>&1 || true
        apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}" \
            >>"$LOGS/apt.log" 2>&1 || die_log "apt-get install ${missing[*]} failed" "$LOGS/apt.log"
    fi
}

# Build dependencies of one library (besides the compiler, make, pkg-config and dpkg-dev).
build_deps() {
    case $1 in
    librdkafka)
        echo libssl-dev zlib1g-dev libzstd-dev liblz4-dev libsasl2-dev python3
        # any libcurl flavour will do; installing the OpenSSL one would remove another
        pkg-config --exists libcurl 2>/dev/null || echo libcurl4-openssl-dev
        ;;
    hiredis) echo libssl-dev ;;
    libmicrohttpd) echo libgnutls28-dev ;;
    esac
}

apt_sources_text() {
    cat <<EOF
# cqrs (deploy/local/libs.sh): source packages of the client libraries it builds.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie sid
Components: main
Signed-By: $KEYRING
EOF
}

# knows_source NAME VERSION: apt's index has that source package (grep reads all of
# apt-cache's output: with -q it could stop early, and pipefail would see apt-cache's SIGPIPE).
knows_source() {
    apt-cache showsrc "$1" 2>/dev/null | grep -x "Version: $2" >/dev/null
}

# ensure_index NAME: apt knows the pinned source version of NAME.
ensure_index() {
    local name=$1 ver=${DEBVER[$1]}
    knows_source "$name" "$ver" && return 0
    if ! is_root; then
        die "apt does not know the source package $name $ver; as root, run this script once" \
            "(it adds $APT_SOURCES and runs apt-get update)"
    fi
    if [[ "$(cat "$APT_SOURCES" 2>/dev/null)" != "$(apt_sources_text)" ]]; then
        log "adding $APT_SOURCES (deb-src trixie sid)"
        apt_sources_text >"$APT_SOURCES"
    fi
    log "apt-get update (the deb-src entry only)"
    mkdir -p "$LOGS"
    apt-get "${APT_OPTS[@]}" update -q -o Dir::Etc::SourceList="$APT_SOURCES" \
        -o Dir::Etc::SourceParts=- -o APT::Get::List-Cleanup=0 >"$LOGS/apt.log" 2>&1 ||
        die_log "apt-get update failed" "$LOGS/apt.log"
    knows_source "$name" "$ver" ||
        die "Debian's archive (trixie, sid) no longer has $name $ver: bump its pin in" \
            "$VERSIONS ('apt-cache showsrc $name' lists what it has)"
}

# --------------------------------------------------------- sources, build ---

dsc_of() { printf '%s/%s_%s.dsc\n' "$DOWNLOADS" "$1" "${DEBVER[$1]#*:}"; }

# The orig tarball named in the .dsc.
orig_of() {
    awk '/^Checksums-Sha256:/ { s = 1; next } /^[^ ]/ { s = 0 } s && $3 ~ /\.orig\.tar\./ { print $3 }' "$1" |
        head -n 1
}

# verify NAME: the downloaded orig tarball has the .dsc's SHA-256 and the pinned one.
verify() {
    local dsc orig want got
    dsc=$(dsc_of "$1")
    [[ -f $dsc ]] || return 1
    orig=$(orig_of "$dsc")
    [[ -n $orig && -f $DOWNLOADS/$orig ]] || return 1
    want=$(awk -v f="$orig" '/^Checksums-Sha256:/ { s = 1; next } /^[^ ]/ { s = 0 } s && $3 == f { print $1 }' "$dsc")
    got=$(sha256sum "$DOWNLOADS/$orig" | cut -d' ' -f1)
    if [[ $got != "$want" ]]; then
        log "$orig: SHA-256 $got, the .dsc says $want"
        return 1
    fi
    if [[ $got != "${SHA256[$1]}" ]]; then
        log "$orig: SHA-256 $got, the pin in $VERSIONS says ${SHA256[$1]}"
        return 1
    fi
}

# fetch NAME: the verified source package in $DOWNLOADS.
fetch() {
    local name=$1 ver=${DEBVER[$1]} tmp
    verify "$name" 2>/dev/null && return 0
    ensure_index "$name"
    log "$name $ver: apt-get source --download-only"
    # apt's downloads run as _apt, which cannot write below a private home folder
    tmp=$(mktemp -d /tmp/cqrs-libs-src.XXXXXX)
    TMP_DIRS+=("$tmp")
    if is_root && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
    mkdir -p "$LOGS"
    (cd "$tmp" && apt-get "${APT_OPTS[@]}" source --download-only "$name=$ver") \
        >"$LOGS/apt-source-$name.log" 2>&1 ||
        die_log "apt-get source $name=$ver failed" "$LOGS/apt-source-$name.log"
    is_root && chown -R 0:0 "$tmp"
    mkdir -p "$DOWNLOADS"
    mv -f "$tmp"/* "$DOWNLOADS/"
    verify "$name" || die "$name $ver: the downloaded sources do not match (see above)"
}

build_librdkafka() {
    ./configure --prefix="$PREFIX" "${RDKAFKA_CONFIGURE[@]}"
    local f
    for f in "${RDKAFKA_FEATURES[@]}"; do
        grep -q "^#define $f 1" config.h || {
            echo "librdkafka: $f is not enabled"
            return 1
        }
    done
    # the linker script (python3) that exports rd_kafka_* only, not the bundled cJSON, nanopb…
    grep -Eq '^WITH_LDS=\s*y' Makefile.config || {
        echo "librdkafka: no linker script (python3 missing?)"
        return 1
    }
    # the C library only (src-cpp is the C++ wrapper)
    make -j"$JOBS" -C src
    make -C src install DESTDIR="$STAGE"
}

build_hiredis() {
    make -j"$JOBS" PREFIX="$PREFIX" "${HIREDIS_MAKE[@]}" dynamic pkgconfig
    make PREFIX="$PREFIX" "${HIREDIS_MAKE[@]}" DESTDIR="$STAGE" install
}

build_libmicrohttpd() {
    ./configure --prefix="$PREFIX" "${MHD_CONFIGURE[@]}"
    make -j"$JOBS"
    make install DESTDIR="$STAGE"
}

# Removes what an earlier build of NAME installed (its stamps list the files).
remove_old() {
    local stamp f
    for stamp in "$STAMPS/$1"-*; do
        [[ -f $stamp ]] || continue
        tail -n +2 "$stamp" | while IFS= read -r f; do
            [[ -n $f && $f != /* && $f != *..* ]] && rm -f "$PREFIX/$f"
        done
        rm -f "$stamp"
    done
}

build() {
    local name=$1 up work dsc L started m
    up=$(upstream_version "$name")
    work=$LIBS/build/$name-$up
    dsc=$(dsc_of "$name")
    L=$LOGS/$name-$up.log
    started=$(date +%s)
    rm -rf "$work"
    mkdir -p "$work" "$LOGS" "$STAMPS" "$PREFIX"
    : >"$L"
    log "$name $up: building (log: $L)"
    dpkg-source --no-copy --skip-patches -x "$dsc" "$work/src" >>"$L" 2>&1 ||
        die_log "$name: dpkg-source -x failed (checksums of the .dsc?)" "$L"
    STAGE=$work/stage
    # In the background and waited for: a subshell tested with || would run with set -e off,
    # going on after a failed step.
    (
        cd "$work/src"
        eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+bindnow dpkg-buildflags --export=sh)"
        set -x
        "build_$name"
    ) >>"$L" 2>&1 &
    wait $! || die_log "$name $up: the build failed" "$L"
    local root=$STAGE$PREFIX
    [[ -d $root ]] || die_log "$name: nothing was installed into $root" "$L"
    # shared libraries only: the daemons load these through their RPATH
    find "$root" \( -name '*.a' -o -name '*.la' -o -name '*-static.pc' \) -delete
    for m in ${MODULES[$name]}; do
        PKG_CONFIG_PATH=$root/lib/pkgconfig PKG_CONFIG_LIBDIR=$root/lib/pkgconfig \
            pkg-config --atleast-version="${MINIMUM[$name]}" "$m" ||
            die_log "$name: $m.pc missing from the build, or older than ${MINIMUM[$name]}" "$L"
    done
    remove_old "$name"
    cp -a --remove-destination "$root/." "$PREFIX/"
    {
        recipe "$name"
        (cd "$root" && find . ! -type d | sed 's|^\./||' | sort)
    } >"$STAMPS/.$name.tmp"
    mv -f "$STAMPS/.$name.tmp" "$(stamp_of "$name")"
    rm -rf "$work"
    log "$name $up: installed into $PREFIX in $(($(date +%s) - started)) s"
}

# ------------------------------------------------------------------- main ---

TMP_DIRS=()
cleanup() {
    local d
    for d in "${TMP_DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$LIBS"
exec 9>"$LIBS/.lock"
if ! flock -n 9; then
    log "waiting for another libs.sh (lock $LIBS/.lock)"
    flock 9
fi

command -v pkg-config >/dev/null || ensure_packages pkg-config

todo=()
for name in "${NAMES[@]}"; do
    if system_has "$name"; then
        log "$name: the system's is at least ${MINIMUM[$name]} ($(env -u PKG_CONFIG_PATH pkg-config --modversion "${MODULES[$name]%% *}")): not built"
    elif cached "$name"; then
        log "$name $(upstream_version "$name"): cached in $PREFIX"
    else
        todo+=("$name")
    fi
done

if [[ ${#todo[@]} -gt 0 ]]; then
    started=$(date +%s)
    deps=(build-essential pkg-config dpkg-dev)
    [[ -f $KEYRING ]] || deps+=(debian-archive-keyring)
    for name in "${todo[@]}"; do
        read -r -a d <<<"$(build_deps "$name" | tr '\n' ' ')"
        deps+=("${d[@]}")
    done
    ensure_packages "${deps[@]}"
    for name in "${todo[@]}"; do fetch "$name"; done
    for name in "${todo[@]}"; do build "$name"; done
    rmdir "$LIBS/build" 2>/dev/null || true
    log "built ${todo[*]} in $(($(date +%s) - started)) s"
fi

mkdir -p "$PREFIX/lib/pkgconfig"
printf '%s\n' "$PREFIX"
