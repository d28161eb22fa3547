"""How many client connections this process can hold.

Each client connection is a file descriptor, and so is the upstream
connection it may hold while proxied. Past the open-files limit, accept()
fails with EMFILE and every new client is reset; under it, the gateway can
still refuse politely.
"""

import resource

from twisted.logger import Logger

log = Logger()

# Descriptors kept back for listeners, the key store, Redis, log files and
# upstream connections that outlive their request in the idle pool.
RESERVE = 128


def raise_open_files_limit():
    """Raise the soft limit on open files to the hard one, where allowed;
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-files limit from {soft}: {why}",
                     soft=soft, why=e)
    return soft


def connection_cap(configured, open_files):
    """The connection cap: `configured` (max_connections, or None for
    automatic) bounded by what `open_files` descriptors allow, half of them
    for clients and half for the upstream connections they may hold."""
    allowed = max(1, (open_files - RESERVE) // 2)
    if configured is None:
        return allowed
    if configured > allowed:
        log.warn("max_connections {configured} is more than {open_files} open files allow;"
                 " using {allowed}", configured=configured, open_files=open_files,
                 allowed=allowed)
        return allowed
    return configured
