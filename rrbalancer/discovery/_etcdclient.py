"""
The little of etcd v3 that discovery and C{rrbalancer-register} need,
spoken through the JSON gateway every etcd serves beside gRPC on its client
port (C{POST /v3/...}; etcd 3.4 and later).  In that JSON, keys and values
are base64 and 64-bit numbers are strings.

The HTTP client is injected: anything with treq's C{post} and
C{json_content} (L{TreqClient} on a given reactor, or
L{treq.testing.StubTreq} in tests).
"""

import base64
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss

__all__ = ["Compacted", "EtcdClient", "EtcdError", "TreqClient", "prefixEnd"]

# Seconds an ordinary call (not a watch) may take before it is given up.
CALL_TIMEOUT = 5.0


class EtcdError(Exception):
    """
    etcd refused a call, or answered what is not its JSON.
    """


class Compacted(EtcdError):
    """
    A watch asked for revisions etcd has compacted away: what happened
    since then can only be read again whole.

    @ivar revision: the oldest revision etcd still has.
    """

    def __init__(self, revision: int) -> None:
        EtcdError.__init__(self, f"revisions up to {revision} were compacted")
        self.revision = revision


class _QuietFactory(_HTTP11ClientFactory):
    # A line per connection to etcd would drown the log.
    noisy = False


class _QuietPool(HTTPConnectionPool):
    _factory = _QuietFactory


class TreqClient:
    """
    treq's C{post} and C{json_content} on an agent of the given reactor (the
    treq module's own functions run on the global one), its connections
    kept for the next call.
    """

    def __init__(self, reactor) -> None:
        self.pool = _QuietPool(reactor, persistent=True)
        self._client = HTTPClient(Agent(reactor, pool=self.pool))
        self.post = self._client.post
        self.json_content = treq.json_content

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


def prefixEnd(prefix: bytes) -> bytes:
    """
    The C{range_end} that makes a range of every key beginning with
    C{prefix}: the prefix with its last byte one higher (C{\\x00}, "every
    key", for a prefix of C{\\xff} bytes alone).
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode(text: Any) -> bytes:
    if not isinstance(text, str):
        return b""
    return base64.b64decode(text)


def revisionOf(answer: Dict[str, Any]) -> int:
    """
    The store's revision an answer was made at.
    """
    return int(answer.get("header", {}).get("revision", 0))


def _errorOf(answer: Any) -> Optional[str]:
    if not isinstance(answer, dict):
        return f"not an etcd answer: {answer!r:.80}"
    if "error" in answer or ("code" in answer and "message" in answer):
        return str(answer.get("message") or answer.get("error"))
    return None


class _LineStream(Protocol):
    """
    The body of a watch, one JSON object a line, each handed over as it
    comes.  (treq's C{collect} would do but for stopping: a watch never
    ends by itself, and only the body's transport can end it.)
    """

    def __init__(self, onObject: Callable[[Any], None], done: Deferred) -> None:
        self._onObject = onObject
        self._done: Optional[Deferred] = done
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                self._onObject(json.loads(line))
            except BaseException as e:
                self._fail(e)
                return

    def _fail(self, reason) -> None:
        done, self._done = self._done, None
        if self.transport is not None:
            self.transport.stopProducing()
        if done is not None:
            done.errback(reason)

    def stop(self) -> None:
        done, self._done = self._done, None
        if self.transport is not None:
            self.transport.stopProducing()
        if done is not None:
            done.callback(None)

    def connectionLost(self, reason) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            done.callback(None)
        else:
            done.errback(reason)


class Watch:
    """
    A watch in progress.

    @ivar done: fires once the stream has ended (with None when it ended
        or was stopped, with the reason when it broke: L{Compacted} when
        its revision is gone).
    """

    def __init__(self) -> None:
        self.done = Deferred(lambda d: self.stop())
        self._request: Optional[Deferred] = None
        self._stream: Optional[_LineStream] = None
        self._stopped = False

    def stop(self) -> None:
        """
        End the watch: C{done} fires with None, and no result is handed over
        afterwards.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._stream is not None:
            self._stream.stop()
        elif self._request is not None:
            request, self._request = self._request, None
            request.addErrback(lambda f: None)
            request.cancel()
            if not self.done.called:
                self.done.callback(None)


class EtcdClient:
    """
    Calls on an etcd cluster, through one of its members at a time.

    @param http: treq's C{post} and C{json_content}.
    @param bases: each member's client URL, such as
        C{http://127.0.0.1:2379} (or one URL).
    @param reactor: for the calls' timeouts.
    """

    def __init__(
        self, http, bases: Union[str, Sequence[str]], reactor, timeout: float = CALL_TIMEOUT
    ) -> None:
        self._http = http
        if isinstance(bases, str):
            bases = [bases]
        self._bases = [base.rstrip("/") for base in bases]
        self._current = 0
        self._reactor = reactor
        self._timeout = timeout

    @property
    def base(self) -> str:
        """
        The member the calls go to.
        """
        return self._bases[self._current]

    def rotate(self) -> None:
        """
        Go to the next member (the first after the last): the caller saw
        this one fail.  (A revision is the cluster's, so a watch resumes on
        any member.)
        """
        self._current = (self._current + 1) % len(self._bases)

    def _post(self, path: str, body: Dict[str, Any], **kwargs) -> Deferred:
        return self._http.post(
            self.base + path,
            data=json.dumps(body).encode("ascii"),
            headers={b"Content-Type": [b"application/json"]},
            reactor=self._reactor,
            **kwargs,
        )

    def call(self, path: str, body: Dict[str, Any]) -> Deferred:
        """
        POST C{body} to C{path}: fires with etcd's answer, or fails with
        L{EtcdError} if etcd refused.
        """
        d = self._post(path, body, timeout=self._timeout)

        def read(response):
            return self._http.json_content(response).addCallback(check, response.code)

        def check(answer, code):
            error = _errorOf(answer)
            if error is not None:
                raise EtcdError(error)
            if code != 200:
                raise EtcdError(f"HTTP {code}")
            return answer

        def unreadable(failure):
            if failure.check(ValueError) and not failure.check(EtcdError):
                raise EtcdError(f"not JSON: {failure.getErrorMessage()}")
            return failure

        return d.addCallback(read).addErrback(unreadable)

    # -- keys ------------------------------------------------------------------

    def range(self, prefix: bytes) -> Deferred:
        """
        Every key beginning with C{prefix}: fires with (revision, [(key,
        value)]).
        """
        body = {"key": encode(prefix), "range_end": encode(prefixEnd(prefix))}
        d = self.call("/v3/kv/range", body)

        def pairs(answer) -> Tuple[int, List[Tuple[bytes, bytes]]]:
            return revisionOf(answer), [
                (decode(kv.get("key")), decode(kv.get("value"))) for kv in answer.get("kvs", [])
            ]

        return d.addCallback(pairs)

    def put(
        self, key: bytes, value: bytes, lease: Optional[str] = None, keepLease: bool = False
    ) -> Deferred:
        """
        Set C{key}, under C{lease}, or with C{keepLease} under the lease it
        has (if any: a key put by C{rrbalancer-register} still goes with
        its registrar).
        """
        body: Dict[str, Any] = {"key": encode(key), "value": encode(value)}
        if lease is not None:
            body["lease"] = lease
        if keepLease:
            body["ignore_lease"] = True
        return self.call("/v3/kv/put", body).addCallback(revisionOf)

    def delete(self, key: bytes) -> Deferred:
        return self.call("/v3/kv/deleterange", {"key": encode(key)}).addCallback(revisionOf)

    def compact(self, revision: int) -> Deferred:
        return self.call("/v3/kv/compaction", {"revision": str(revision)})

    def status(self) -> Deferred:
        """
        The member's status: a cheap call that says etcd answers.
        """
        return self.call("/v3/maintenance/status", {})

    # -- leases ------------------------------------------------------------------

    def grant(self, ttl: int) -> Deferred:
        """
        A new lease: fires with (its id, its TTL).
        """
        d = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return d.addCallback(lambda answer: (str(answer["ID"]), int(answer.get("TTL", 0))))

    def keepAlive(self, lease: str) -> Deferred:
        """
        Renew a lease: fires with its TTL again, 0 if it has expired.
        """
        d = self.call("/v3/lease/keepalive", {"ID": lease})
        return d.addCallback(lambda answer: int(answer.get("result", {}).get("TTL", 0)))

    def revoke(self, lease: str) -> Deferred:
        return self.call("/v3/lease/revoke", {"ID": lease})

    # -- watching ----------------------------------------------------------------

    def watch(
        self, prefix: bytes, start: int, onResult: Callable[[Dict[str, Any]], None]
    ) -> Watch:
        """
        Watch every key beginning with C{prefix} from revision C{start} on:
        C{onResult} is called with each of etcd's results in turn (its
        first says C{created}; the next carry C{events}).
        """
        watch = Watch()
        body = {
            "create_request": {
                "key": encode(prefix),
                "range_end": encode(prefixEnd(prefix)),
                "start_revision": str(start),
            }
        }

        def onObject(message):
            error = _errorOf(message)
            if error is not None:
                raise EtcdError(error)
            result = message.get("result", {})
            compacted = int(result.get("compact_revision", 0) or 0)
            if compacted:
                raise Compacted(compacted)
            if result.get("canceled"):
                raise EtcdError(f"watch canceled: {result.get('cancel_reason') or 'no reason'}")
            if not watch._stopped:
                onResult(result)

        def streaming(response):
            watch._request = None
            if watch._stopped:
                response.deliverBody(Protocol())
                return
            if response.code != 200:
                raise EtcdError(f"watch: HTTP {response.code}")
            finished = Deferred()
            watch._stream = _LineStream(onObject, finished)
            response.deliverBody(watch._stream)
            return finished

        # The timeout is for the answer's head alone, which etcd sends at once.
        request = watch._request = self._post(
            "/v3/watch", body, unbuffered=True, timeout=self._timeout
        )
        request.addCallback(streaming)

        def ended(result):
            if not watch.done.called:
                watch.done.callback(None)
            return None

        def broke(failure):
            if not watch.done.called and not watch._stopped:
                watch.done.errback(failure)
            return None

        request.addCallbacks(ended, broke)
        return watch
