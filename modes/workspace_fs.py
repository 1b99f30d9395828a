"""Opening a path beneath a directory, race-free: the workspace's confinement primitive.

Checking a path (say, `Path.resolve`) and then opening it by name can be raced: swap a
directory for a symlink between the two and the open lands outside. Here the check
and the open are one step, relative to a directory fd: every component is looked up
beneath the root, symlinks included, and no path ever leaves it.

`open_beneath(root_fd, path, flags, mode)` returns an fd for `path` resolved beneath
`root_fd`, as Linux `openat2(2)` does with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`:
an absolute path, a `..` above the root, an absolute symlink or one whose target
climbs above the root fails with `EXDEV`; more than 40 symlinks, with `ELOOP`; any
other failure is the usual `OSError`. Symlinks that stay beneath the root are
followed. It uses `openat2` where the kernel has it (5.6+), else `walk_beneath`, which
does the same in user space: component by component, each opened `O_NOFOLLOW`
relative to the fd of its parent, symlinks read from the fd of the link itself and
expanded by us. Both are public so that both can be tested on any kernel.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Callable

Opener = Callable[[int, "str | bytes", int, int], int]

MAX_SYMLINKS = 40  # the kernel's limit for one lookup

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS

# openat2 came after the syscall tables were unified: 437 on both. Elsewhere we do not
# guess a number; the walk is used.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
# openat2 answers EAGAIN when a rename raced its `..` check; the kernel asks us to retry.
_OPENAT2_RETRIES = 16


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]


def _encode(path: str | bytes) -> bytes:
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise ValueError("embedded null byte")  # as os.open says; a C string would end there
    return raw


def openat2_beneath(root_fd: int, path: str | bytes, flags: int, mode: int = 0o666) -> int:
    """`open_beneath` by the kernel; OSError(ENOSYS) where it has no openat2."""
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), path)
    raw = _encode(path)
    # openat2 refuses a mode without O_CREAT or O_TMPFILE (whose bits include
    # O_DIRECTORY's), and does not add O_CLOEXEC.
    creates = flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE
    how = _OpenHow(flags | os.O_CLOEXEC, mode if creates else 0, _RESOLVE)
    for _ in range(_OPENAT2_RETRIES):
        fd: int = _syscall(_SYS_OPENAT2, root_fd, raw, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code not in (errno.EINTR, errno.EAGAIN):
            break
    raise OSError(code, os.strerror(code), path)


def walk_beneath(root_fd: int, path: str | bytes, flags: int, mode: int = 0o666) -> int:
    """`open_beneath` in user space (what `openat2_beneath` does, for kernels without it).

    `chain` holds an O_PATH fd of each directory from the root down to where the walk
    is, so `..` is one step up that chain, never a lookup the file system could race.
    The errors are the kernel's, in the kernel's order (tests compare the two).
    """
    raw = _encode(path)
    if raw.startswith(b"/"):
        raise OSError(errno.EXDEV, "absolute path", path)
    if not raw:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    todo, slash = _components(raw)
    chain = [os.open(".", os.O_PATH | os.O_DIRECTORY, dir_fd=root_fd)]
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name == b".":
                if todo:
                    continue
                break  # the path ends in `.`: it names the directory reached
            if name == b"..":
                if len(chain) == 1:
                    raise OSError(errno.EXDEV, "'..' above the root", path)
                os.close(chain.pop())
                continue
            if not todo:  # the last name: opened for real, unless it is a symlink
                if slash and flags & os.O_CREAT:
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
                fd = _open_last(chain[-1], name, flags | (os.O_DIRECTORY if slash else 0), mode)
                if fd is not None:
                    return fd
            node = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=chain[-1])
            kind = os.fstat(node).st_mode
            if stat.S_ISLNK(kind) or not todo:
                # A symlink to expand; or, last, a name that was one a moment ago and is
                # not any more: either way one more turn, counted against the limit.
                links += 1
                if links > MAX_SYMLINKS:
                    os.close(node)
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
                target = _read_link(node, path) if stat.S_ISLNK(kind) else name
                os.close(node)
                names, target_slash = _components(target)
                slash |= target_slash and not todo  # `link` -> `dir/`: the last name is a directory
                todo += names
            elif stat.S_ISDIR(kind):
                chain.append(node)
            else:
                os.close(node)
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        # The path ends in `.` or `..`: it names the directory reached.
        if flags & os.O_CREAT:
            code = errno.EEXIST if flags & os.O_EXCL else errno.EISDIR
            raise OSError(code, os.strerror(code), path)
        return os.open(".", flags, mode, dir_fd=chain[-1])
    finally:
        for fd in chain:
            os.close(fd)


def _components(raw: bytes) -> tuple[list[bytes], bool]:
    """The names of a relative path as a stack (the next name last), and whether it ends
    in a slash. Empty names and `.` are dropped, but for a last `.`: `a/.` must find a
    directory `a` (a symlink followed), where `a` alone may be anything."""
    names = [name for name in raw.split(b"/") if name]
    last_dot = bool(names) and names[-1] == b"."
    names = [name for name in names if name != b"."] + ([b"."] if last_dot else [])
    return names[::-1], raw.endswith(b"/") and not last_dot


def _read_link(node: int, path: str | bytes) -> bytes:
    """The target of the symlink `node` (an O_PATH fd of the link itself, so the link
    read is the one we looked at); an absolute target leaves the root."""
    target = os.readlink(b"", dir_fd=node)
    if target.startswith(b"/"):
        raise OSError(errno.EXDEV, "absolute symlink", path)
    return target


def _open_last(parent: int, name: bytes, flags: int, mode: int) -> int | None:
    """Open the last name for real, without following a symlink; None if it is one now
    (swapped in since it was looked at: the caller expands it)."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=parent)
    except OSError as exc:
        # O_NOFOLLOW on a symlink: ELOOP, or ENOTDIR with O_DIRECTORY. Is it one?
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(parent, name):
            return None
        raise
    if flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
        os.close(fd)  # O_PATH opens the link itself
        return None
    return fd


def _is_symlink(parent: int, name: bytes) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _probe_openat2() -> bool:
    """Whether this kernel (and its seccomp filter) lets us call openat2."""
    try:
        root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        os.close(openat2_beneath(root, ".", os.O_PATH | os.O_DIRECTORY))
        return True
    except OSError:  # ENOSYS; EPERM from a container's seccomp filter
        return False
    finally:
        os.close(root)


_openat2_available: bool | None = None


def open_beneath(root_fd: int, path: str | bytes, flags: int, mode: int = 0o666) -> int:
    """Open `path` beneath `root_fd` (see the module's doc): openat2, else the walk."""
    global _openat2_available
    if _openat2_available is None:
        _openat2_available = _probe_openat2()
    if _openat2_available:
        return openat2_beneath(root_fd, path, flags, mode)
    return walk_beneath(root_fd, path, flags, mode)
