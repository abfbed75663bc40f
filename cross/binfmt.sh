# shellcheck shell=bash
# Sourced by cross/guest.sh and cross/test-arch.sh: run ARCH binaries under qemu-user through
# binfmt_misc for the length of one script, and undo exactly what was done.
#   binfmt_on QEMU   (QEMU = aarch64 | arm) mounts binfmt_misc and enables qemu-QEMU if needed
#   binfmt_undo      disables/unmounts only what binfmt_on changed (call it from an EXIT trap)
_binfmt_enabled=
_binfmt_mounted=

binfmt_on() {
  local q=$1 missing=()
  [ -x "/usr/bin/qemu-$q-static" ] || missing+=(qemu-user-static)
  command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "binfmt: apt-get install ${missing[*]}" >&2
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    _binfmt_mounted=1
  fi
  if [ "$(head -1 "/proc/sys/fs/binfmt_misc/qemu-$q" 2>/dev/null)" != enabled ]; then
    update-binfmts --enable "qemu-$q"
    _binfmt_enabled=$q
  fi
  # F flag: the kernel opened the interpreter at registration, so chroots need no qemu copy
  if ! grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/qemu-$q"; then
    echo "binfmt: qemu-$q is registered without the F flag (a chroot would not find qemu)" >&2
    return 1
  fi
}

binfmt_undo() {
  [ -z "$_binfmt_enabled" ] || update-binfmts --disable "qemu-$_binfmt_enabled" >/dev/null 2>&1 || true
  [ -z "$_binfmt_mounted" ] || umount /proc/sys/fs/binfmt_misc 2>/dev/null || true
  _binfmt_enabled='' _binfmt_mounted=''
}
