# Sourced by scripts/build-wheels and scripts/test-aarch64: the aarch64 cross toolchain and an
# arm64 Debian rootfs with Python for qemu-user. Idempotent: installs and builds only what is
# missing (root for apt-get, the first time; sudo is used when available and not root).
#
# rustup cannot download targets here, so the cross compiler is Debian's rustc-web
# (bookworm-security) with its matching aarch64 std (libstd-rust-web-dev:arm64), linked into
# rustup as the toolchain "debian-web" and selected with RUSTUP_TOOLCHAIN for cross builds only
# (`cross cargo ...`). rustup's stable with Debian's std fails with E0463 / E0514.
#
# Env: WORK  toolchain links, rootfs, target dirs, site-packages (default ~/.cache/gemma_rs/aarch64)

WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/gemma_rs/aarch64}
TARGET=aarch64-unknown-linux-gnu
TOOLCHAIN=debian-web
ROOTFS=$WORK/rootfs
step() { printf '\n== %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "scripts/aarch64-env.sh: '$*' needs root, and there is no sudo" >&2
        return 1
    fi
}

# Debian packages: the cross compiler, its std, the gcc cross linker (for `cargo test`), qemu-user
# and mmdebstrap.
aarch64_packages() {
    local pkgs=(rustc-web cargo-web rust-web-clippy libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu
        libc6-dev-arm64-cross qemu-user mmdebstrap)
    local missing=() p
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "apt-get install ${missing[*]}"
        dpkg --print-foreign-architectures | grep -qx arm64 || as_root dpkg --add-architecture arm64
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    local v_host v_std
    v_host=$(dpkg-query -W -f='${Version}' rustc-web)
    v_std=$(dpkg-query -W -f='${Version}' libstd-rust-web-dev:arm64)
    if [ "$v_host" != "$v_std" ]; then
        echo "rustc-web $v_host and libstd-rust-web-dev:arm64 $v_std differ (E0514 ahead)" >&2
        return 1
    fi
}

# Debian's rustc/cargo/clippy as a rustup toolchain (or first on PATH when there is no rustup).
aarch64_toolchain() {
    mkdir -p "$WORK/toolchain/bin"
    local b
    for b in rustc rustdoc cargo cargo-clippy clippy-driver; do
        ln -sfn "/usr/bin/$b" "$WORK/toolchain/bin/$b"
    done
    ln -sfn /usr/lib "$WORK/toolchain/lib" # rustc finds its sysroot (/usr) from /usr/bin/rustc
    if command -v rustup >/dev/null; then
        rustup toolchain list | grep -q "^$TOOLCHAIN" || rustup toolchain link "$TOOLCHAIN" "$WORK/toolchain"
    fi
}

# Runs a command with the cross toolchain: `cross cargo build --target $TARGET`.
cross() {
    if command -v rustup >/dev/null; then
        RUSTUP_TOOLCHAIN=$TOOLCHAIN "$@"
    else
        PATH=$WORK/toolchain/bin:$PATH "$@"
    fi
}

# An arm64 Debian bookworm with python3 (3.11), extracted without emulation, for
# `qemu-aarch64 -L $ROOTFS`. Without the merged-usr hook it silently falls back to the host's
# libraries; -L /usr/aarch64-linux-gnu (the cross libc) makes thread creation hang.
aarch64_rootfs() {
    if [ ! -L "$ROOTFS/lib" ] || [ ! -x "$ROOTFS/usr/bin/python3" ] ||
        [ ! -e "$ROOTFS/usr/lib/aarch64-linux-gnu/libc.so.6" ] ||
        [ ! -e "$ROOTFS/usr/lib/aarch64-linux-gnu/libstdc++.so.6" ]; then
        step "arm64 rootfs with python3 at $ROOTFS"
        as_root rm -rf "$ROOTFS"
        # libstdc++6: numpy's extension needs it (else qemu would quietly take the host's).
        as_root mmdebstrap --variant=extract --architectures=arm64 \
            --include=libc6,libgcc-s1,libstdc++6,python3 \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr bookworm "$ROOTFS"
        # Owned by the user, so that Python can write its .pyc files there.
        as_root chown -R "$(id -u):$(id -g)" "$ROOTFS"
    fi
}

aarch64_setup() {
    aarch64_packages
    aarch64_toolchain
    aarch64_rootfs
    cross rustc -V
}
