#!/usr/bin/env bash
# Builds a Pangolin kernel (vmlinux, no modules) from Debian's linux-source-6.1 and caches it.
#
#   build-kernel.sh VARIANT OUT
#
# VARIANT is `guest` (guest.config) or `testhost` (guest.config + testhost.config). The result is
# cached outside the checkout, keyed by the source package version and a hash of the fragments,
# the patches and this script, so a fresh clone (CI) reuses it and an unchanged rebuild is a copy.
#
# Patches in patches/ are applied to the extracted source. 0001 adds the boot parameter
# `int3_selftest=off`: a PVM (shadow-paging) KVM cannot emulate INT3 in guest kernel mode, so
# the boot-time INT3 self-test would BUG() there. The cmdline workarounds for such hosts are
# described in README.md of this directory. 0002 makes a power-off without firmware a reset (how
# the VMM learns the guest is done). 0003 adds `lapic_timer_khz=N`: a VMM that knows its local
# APIC timer's frequency (QEMU/TCG) spares the guest the 200 ms calibration against the PIT.
set -euo pipefail

variant=${1:?usage: build-kernel.sh guest|testhost OUT}
out=${2:?usage: build-kernel.sh guest|testhost OUT}
here=$(cd "$(dirname "$0")" && pwd)
cache=${PANGOLIN_CACHE:-$HOME/.cache/pangolin}
tarball=/usr/src/linux-source-6.1.tar.xz

case "$variant" in
  guest) fragments=("$here/guest.config") ;;
  testhost) fragments=("$here/guest.config" "$here/testhost.config") ;;
  *) echo "build-kernel.sh: unknown variant '$variant' (guest|testhost)" >&2; exit 2 ;;
esac

need_pkgs=()
[ -f "$tarball" ] || need_pkgs+=(linux-source-6.1)
for tool in bc flex bison make gcc; do command -v "$tool" >/dev/null || need_pkgs+=("$tool"); done
[ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "build-kernel.sh: installing ${need_pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# Bump when a change to this script changes the kernel it produces.
KEY_VERSION=1
version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$KEY_VERSION $version"; cat "${fragments[@]}" "$here"/patches/*.patch; } | sha256sum | cut -c1-16)
cached="$cache/kernel/$variant-$version-$key/vmlinux"
mkdir -p "$(dirname "$out")"

if [ -f "$cached" ]; then
  cp "$cached" "$out.tmp.$$" && mv "$out.tmp.$$" "$out"
  echo "kernel $variant: cached $cached"
  exit 0
fi

# One build at a time per cache (parallel test runs may all ask for the kernel).
mkdir -p "$cache"
exec 9>"$cache/kernel-build.lock"
flock 9
if [ -f "$cached" ]; then
  cp "$cached" "$out.tmp.$$" && mv "$out.tmp.$$" "$out"
  echo "kernel $variant: cached $cached (built meanwhile)"
  exit 0
fi

# Extract (once per source version + patch set) and patch.
patch_key=$(cat "$here"/patches/*.patch | sha256sum | cut -c1-16)
src="$cache/src/linux-$version-$patch_key"
if [ ! -f "$src/.pangolin-ready" ]; then
  rm -rf "$src" && mkdir -p "$src"
  echo "kernel: extracting $tarball" >&2
  tar -xf "$tarball" -C "$src" --strip-components=1
  for p in "$here"/patches/*.patch; do patch -d "$src" -p1 --quiet < "$p"; done
  touch "$src/.pangolin-ready"
fi

build="$cache/build/$variant-$patch_key"
mkdir -p "$build"
merged="$build/pangolin.fragment"
cat "${fragments[@]}" > "$merged"
make -s -C "$src" O="$build" KCONFIG_ALLCONFIG="$merged" allnoconfig >/dev/null

# Every option asked for must have survived Kconfig's dependency resolution.
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=*) ;; *) continue ;; esac
  opt=${line%%=*}; val=${line#*=}
  if [ "$val" = n ]; then
    grep -q "^$opt=" "$build/.config" && { echo "kernel: $opt should be unset" >&2; missing=1; }
  else
    grep -qx "$opt=$val" "$build/.config" || { echo "kernel: $opt=$val did not survive allnoconfig (check its dependencies)" >&2; missing=1; }
  fi
done < <(tac "$merged" | awk -F= '/^CONFIG_/ && !seen[$1]++' )
[ "$missing" = 0 ] || exit 1

jobs=$(( $(nproc) + 1 ))
echo "kernel $variant: building with make -j$jobs (several minutes the first time)" >&2
make -s -C "$src" O="$build" -j"$jobs" vmlinux
mkdir -p "$(dirname "$cached")"
cp "$build/vmlinux" "$cached.tmp" && mv "$cached.tmp" "$cached"
cp "$cached" "$out.tmp.$$" && mv "$out.tmp.$$" "$out"
echo "kernel $variant: built $cached"
