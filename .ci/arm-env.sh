# Cross-compiling the agent for the gateways without `cross` (its images cannot be pulled here):
# rustup targets + Debian's cross gcc as linker and C compiler (bundled SQLite, ring), and
# qemu-user as the test runner. Sourced by .ci/arm.sh and agent/deploy/flash.sh.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUNNER="qemu-arm -L /usr/arm-linux-gnueabihf"
# Packed relative relocations (DT_RELR): the position-independent agent has about 44,000
# relative relocations, 24 bytes each in .rela.dyn (1 MB of the gateway binary); packed into
# .relr.dyn they take a few KB. Debian 12's cross ld (binutils 2.40) packs them only for x86, so
# the ARM builds link with LLVM's lld, the one rustup ships with the toolchain (`gcc-ld/ld.lld`,
# driven by the cross gcc, which still supplies the sysroot's start files and libraries).
# A DT_RELR binary needs glibc >= 2.36 on the gateway (Debian 12, Raspberry Pi OS 12, Ubuntu 22.10
# and later); an older glibc refuses to start it, naming GLIBC_ABI_DT_RELR.
_ew_gcc_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
_ew_relr="-C link-arg=-B$_ew_gcc_ld -C link-arg=-fuse-ld=lld -C link-arg=-Wl,-z,pack-relative-relocs"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="$_ew_relr"
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_RUSTFLAGS="$_ew_relr"
unset _ew_gcc_ld _ew_relr
