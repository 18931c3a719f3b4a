"""Run `edge-build ARGS` with every internet socket refused (the reliability suite's offline CLI).

Name resolution and AF_INET/AF_INET6 connects raise, so a stage that tries to fetch
anything fails loudly instead of passing on a machine that happens to be online.
Local (AF_UNIX) sockets keep working. Where the suite can, it also runs this inside
`unshare -n` (a network namespace with no interface), which covers child processes too.
"""

from __future__ import annotations

import socket
import sys

BANNED = (socket.AF_INET, socket.AF_INET6)


class NetworkForbidden(OSError):
    pass


def _refuse(*args, **kwargs):
    raise NetworkForbidden("edge-build reliability suite: network access attempted")


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guarded(original):
    def connect(self, address):
        if self.family in BANNED:
            _refuse()
        return original(self, address)

    return connect


socket.socket.connect = _guarded(_connect)
socket.socket.connect_ex = _guarded(_connect_ex)
socket.getaddrinfo = _refuse
socket.gethostbyname = _refuse
socket.create_connection = _refuse

if __name__ == "__main__":
    sys.path.pop(0)  # this file's directory must not shadow anything
    from edge_build.cli import main

    main(prog_name="edge-build")
