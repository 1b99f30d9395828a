"""sd_notify(3) without libsystemd: READY, STATUS, STOPPING and the watchdog.

The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (a path, or `@name` in the abstract namespace). Outside systemd the
variable is unset and every call is a no-op. A send never blocks and never fails the
daemon: a full or vanished socket only loses that message, as with libsystemd.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import MutableMapping

import msgspec
import trio

log = logging.getLogger("genvisor.daemon")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier(msgspec.Struct, frozen=True):
    address: str | None = None  # $NOTIFY_SOCKET
    watchdog_usec: int | None = None  # $WATCHDOG_USEC, when the watchdog is ours to keep

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], pid: int) -> Notifier:
        """Read and remove the variables (as sd_notify's `unset_environment` does), so
        workers and the commands they run do not inherit them."""
        address, usec, watchdog_pid = (environ.pop(name, None) for name in _VARIABLES)
        if address and not address.startswith(("/", "@")):
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an @abstract name", address)
            address = None
        return cls(address=address or None, watchdog_usec=_watchdog_usec(usec, watchdog_pid, pid))

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram; False if there was no one to tell."""
        if self.address is None:
            return False
        # A leading '@' is systemd's spelling of the abstract namespace's NUL byte.
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
                sock.sendto("\n".join(fields).encode(), address)
        except OSError as exc:
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    async def keep_watchdog(self) -> None:
        """Ping at half the interval (as sd_watchdog_enabled(3) advises). It runs on the
        Trio loop on purpose: a ping proves the loop is alive, so a blocked loop
        misses its pings and systemd restarts the daemon."""
        if self.watchdog_usec is None or self.address is None:
            return
        period_s = self.watchdog_usec / 2_000_000
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(period_s)


def _watchdog_usec(usec: str | None, watchdog_pid: str | None, pid: int) -> int | None:
    if not usec:
        return None
    if watchdog_pid and watchdog_pid != str(pid):
        return None  # the watchdog belongs to another process (e.g. a wrapper's child)
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", usec)
        return None
    return value
