"""
Outlier ejection: a backend failing client requests is set aside a while.

The active checks ask a backend one question now and then; the client
requests ask it all the time.  A backend that passes its checks but fails
request after request (a broken deploy behind a healthy status page, a
server out of some resource the check does not touch) is ejected for a
while, whatever its checks say, and comes back by itself when the time is
up.  The two judges are kept apart, as Envoy keeps them: an ejection does
not touch the rise/fall counts, and a backend the checks take down while
it is ejected stays down after.
"""

from dataclasses import dataclass
from typing import Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# However often a backend was ejected, it is back after this long.
MAX_EJECTION = 300.0


@dataclass(frozen=True)
class Ejection:
    """
    When failures seen on client requests set a backend aside (outlier
    ejection: NGINX's C{max_fails}/C{fail_timeout}, Envoy's consecutive
    gateway failures).

    @ivar after: failures in a row that eject; 0 never ejects.
    @ivar time: seconds of the first ejection; the n-th lasts n times as
        long, up to L{MAX_EJECTION}.
    @ivar on5xx: a 5xx answer counts as a failure.
    @ivar maxPercent: at most this share of the group is ejected at once.
    """

    after: int = 5
    time: float = 30.0
    on5xx: bool = False
    maxPercent: int = 50

    @classmethod
    def fromConfig(cls, config) -> "Ejection":
        return cls(config.ejectAfter, config.ejectTime, config.ejectOn5xx,
                   config.maxEjectedPercent)


class Ejector:
    """
    The ejections in one group: who is set aside, until when, and the
    timers that bring them back.

    What is per backend (its failures in a row, its ejections so far, when
    it is back, its readmission timer) is kept on the backend, which shows
    it in the figures; the deciding is done here.

    @ivar settings: when to eject, and for how long (an L{Ejection}); a
        reload replaces it, and the ejections under way run their course.
    @ivar ejected: how many backends are ejected now.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: Ejection,
        replace: Callable[[object], None],
        size: Callable[[], int],
        log: Logger,
    ) -> None:
        """
        @param replace: places a backend among the candidates again, as its
            ejection starts or ends (the group's C{_place}).
        @param size: how many backends the group has, which bounds how many
            may be ejected at once.
        @param log: the group's, so that operators find these lines where
            they find the group's other lines.
        """
        self.settings = settings
        self.ejected = 0
        self._clock = clock
        self._replace = replace
        self._size = size
        self.log = log

    def requestFailed(self, backend, reason: str) -> None:
        """
        A client request failed on C{backend}, one of the group's: eject it
        once that has happened C{settings.after} times in a row, as long as
        the group may spare it.
        """
        settings = self.settings
        backend.consecutiveFailures += 1
        if (
            not settings.after
            or backend.consecutiveFailures < settings.after
            or backend.ejectedUntil is not None
        ):
            return
        if (self.ejected + 1) * 100 > settings.maxPercent * self._size():
            return
        now = self._clock.seconds()
        if backend._ejectionEnded is not None and now - backend._ejectionEnded > MAX_EJECTION:
            # Well for long enough: its next ejection is short again.
            backend.ejections = 0
        backend.ejections += 1
        seconds = min(settings.time * backend.ejections, MAX_EJECTION)
        failures, backend.consecutiveFailures = backend.consecutiveFailures, 0
        backend.ejectedUntil = now + seconds
        self.ejected += 1
        backend._readmission = self._clock.callLater(seconds, self._readmit, backend)
        backend._changed(f"ejected after {failures} failed requests in a row: {reason}")
        self._replace(backend)
        self.log.warn(
            "backend {url} ejected for {seconds:g} s after {n} failed requests in a row: {reason}",
            url=backend.url, seconds=seconds, n=failures, reason=reason,
        )

    def _readmit(self, backend) -> None:
        backend._readmission = None
        if backend.ejectedUntil is None:
            return
        backend.ejectedUntil = None
        backend._ejectionEnded = self._clock.seconds()
        self.ejected -= 1
        backend._changed("ejection over")
        self._replace(backend)
        self.log.info("backend {url} is back from its ejection", url=backend.url)

    def forget(self, backend) -> None:
        """
        C{backend} leaves the group: it no longer counts as ejected, and no
        timer will bring it back.
        """
        self._cancelReadmission(backend)
        if backend.ejectedUntil is not None:
            backend.ejectedUntil = None
            self.ejected -= 1

    def stop(self, backends: Iterable) -> None:
        """
        Cancel the readmission timers of C{backends}, as the balancer stops.
        """
        for backend in backends:
            self._cancelReadmission(backend)

    def _cancelReadmission(self, backend) -> None:
        if backend._readmission is not None:
            backend._readmission.cancel()
            backend._readmission = None
