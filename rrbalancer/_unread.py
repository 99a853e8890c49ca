"""
Which backends' answers have reached this host and wait, unread, in the
kernel's socket buffers.

A busy balancer reads an answer a turn of its loop or more after it came.
Until then the request it answers counts as in flight, so that a
load-aware policy sees each backend as loaded as the balancer is late:
under load on CPython, a fast backend that holds a dozen requests looks
as if it held twenty-five, and a backend ten times slower, holding few,
looks cheap.  The kernel knows better.  One C{epoll} set holds the
backend connections; polled without waiting, it names those with bytes
come, and among them the ones whose request has its answer: the load
less those is what the backends themselves still have to answer.

The set is edge-triggered: a poll names only the connections that
received something since the last one, so that a count kept up to date
at every pick costs a system call and a step for each answer come since,
not for each answer waiting.  A connection says when its answer is read
(L{UnreadAnswers.settled}), and leaves the count.
"""

import select
from typing import Dict, Set

from ._twisted import tcpUnder


class UnreadAnswers:
    """
    Counts, per connection pool, the requests whose answer is waiting
    unread.  Without C{epoll} (not Linux) it counts none, and the load
    stays what it was.
    """

    def __init__(self) -> None:
        epoll = getattr(select, "epoll", None)
        self._epoll = epoll() if epoll is not None else None
        self._byFD: Dict[int, object] = {}
        self._fds: Dict[object, int] = {}
        self._counts: Dict[object, int] = {}
        # The connections counted, until their answer is read.
        self._ready: Set[object] = set()

    def watch(self, connection) -> None:
        """
        Watch C{connection} (a L{rrbalancer.client.BackendConnection}, on a
        TCP transport, possibly under TLS) until L{forget}.  Watching costs
        one system call as a connection opens, and one as it closes.
        """
        tcp = tcpUnder(connection.transport)
        if self._epoll is None or tcp is None:
            return
        fd = tcp.fileno()
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        except OSError:
            return
        self._byFD[fd] = connection
        self._fds[connection] = fd

    def forget(self, connection) -> None:
        fd = self._fds.pop(connection, None)
        if fd is None:
            return
        del self._byFD[fd]
        self.settled(connection)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            # Closed already, which took it out of the set.
            pass

    def settled(self, connection) -> None:
        """
        C{connection}'s answer is no longer waiting: it was read, or the
        exchange given up.
        """
        if connection in self._ready:
            self._ready.discard(connection)
            pool = connection.pool
            left = self._counts[pool] - 1
            if left:
                self._counts[pool] = left
            else:
                # Nothing kept of a pool with no answer waiting: it may be
                # a removed backend's.
                del self._counts[pool]

    def refresh(self) -> None:
        """
        Count the answers come since the last refresh (those read already
        are not named by the kernel).
        """
        if not self._byFD:
            return
        byFD = self._byFD
        ready = self._ready
        counts = self._counts
        for fd, _ in self._epoll.poll(0):
            connection = byFD.get(fd)
            if connection is not None and connection not in ready and connection.awaitingAnswer:
                ready.add(connection)
                pool = connection.pool
                counts[pool] = counts.get(pool, 0) + 1

    def waiting(self, pool) -> int:
        """
        Requests on C{pool}'s connections whose answer is waiting unread.
        """
        return self._counts.get(pool, 0)

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._byFD.clear()
        self._fds.clear()
        self._counts = {}
        self._ready = set()
