"""
Tests for the dashboard: its assets as served, and the page itself in a
real headless Chromium (Debian's C{chromium} package), driven over the
DevTools protocol on a pipe (C{--remote-debugging-pipe}: no driver, no
websocket, no network), against a real balancer on loopback.

Without Chromium the browser test is skipped, except under CI (C{CI} set),
where it fails: CI installs Chromium itself (see C{.ci/run}).
"""

import json
import os
import re
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from rrbalancer.backends import DRAINING, UP
from rrbalancer.config import HealthConfig

from .test_admin import (
    InMemoryAdmin,
    balancerConfig,
    call,
    makeClient,
    poll,
    settleConnections,
    startBackend,
    startWithAdmin,
)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--password-store=basic",
    "--window-size=1280,900",
    "--remote-debugging-pipe",
]


def findChromium():
    for candidate in (os.environ.get("RRBALANCER_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class StaticTests(SynchronousTestCase):
    """
    The page and its assets are served by the admin listener, and nothing
    in them comes from anywhere else.
    """

    def get(self, path, method="GET"):
        code, _, response, content = InMemoryAdmin().request(method, path)
        return code, response, content

    def test_index(self):
        code, response, content = self.get("/")
        self.assertEqual(code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
        )
        self.assertIn(b'<script src="dashboard.js" defer></script>', content)
        self.assertIn(b'href="dashboard.css"', content)
        csp = response.headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"default-src 'self'", csp)
        self.assertIn(b"frame-ancestors 'none'", csp)

    def test_assets(self):
        for path, contentType in [
            ("/dashboard.js", b"text/javascript; charset=utf-8"),
            ("/dashboard.css", b"text/css; charset=utf-8"),
            ("/favicon.svg", b"image/svg+xml"),
        ]:
            code, response, content = self.get(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [contentType])
            self.assertTrue(content)

    def test_head(self):
        code, response, content = self.get("/", method="HEAD")
        self.assertEqual((code, content), (200, b""))

    def test_nothingFromElsewhere(self):
        """
        No URL in the page or its assets points off the balancer (the SVG
        namespace is a name, not a fetch).
        """
        for path in ("/", "/dashboard.js", "/dashboard.css", "/favicon.svg"):
            _, _, content = self.get(path)
            urls = set(re.findall(rb"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", content))
            urls -= {b"http://www.w3.org/2000/svg"}
            self.assertEqual(urls, set(), path)
            self.assertNotIn(b"@import", content)


class CDPError(Exception):
    pass


class Chromium(ProcessProtocol):
    """
    Headless Chromium and the DevTools protocol on its pipe: commands go to
    its fd 3, answers and events come from its fd 4, each message JSON
    ended by a NUL.
    """

    def __init__(self) -> None:
        self.ended = Deferred()
        self.events = []
        self.stderr = b""
        self._buffer = b""
        self._pending = {}
        self._nextID = 0

    def childDataReceived(self, fd, data):
        if fd != 4:
            self.stderr = (self.stderr + data)[-20000:]
            return
        self._buffer += data
        while b"\0" in self._buffer:
            message, self._buffer = self._buffer.split(b"\0", 1)
            self._received(json.loads(message))

    def _received(self, message):
        if "id" not in message:
            self.events.append(message)
            return
        d = self._pending.pop(message["id"], None)
        if d is None:
            return
        if "error" in message:
            d.errback(CDPError(message["error"]))
        else:
            d.callback(message.get("result", {}))

    def send(self, method, params=None, sessionId=None) -> Deferred:
        self._nextID += 1
        message = {"id": self._nextID, "method": method, "params": params or {}}
        if sessionId is not None:
            message["sessionId"] = sessionId
        d = Deferred()
        self._pending[self._nextID] = d
        self.transport.writeToChild(3, json.dumps(message).encode("utf-8") + b"\0")
        return d

    def processEnded(self, reason):
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(CDPError(f"chromium ended: {reason.getErrorMessage()}"))
        self.ended.callback(None)


class Page:
    """
    One tab, and what a test does with it.
    """

    def __init__(self, browser: Chromium, sessionId: str) -> None:
        self.browser = browser
        self.sessionId = sessionId

    def send(self, method, params=None):
        return self.browser.send(method, params, self.sessionId)

    @inlineCallbacks
    def evaluate(self, expression):
        result = yield self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    @inlineCallbacks
    def waitFor(self, expression, what, timeout=15.0):
        """
        Evaluate C{expression} until it is true; at most C{timeout} seconds.
        """
        deadline = reactor.seconds() + timeout
        while True:
            value = yield self.evaluate(expression)
            if value:
                return value
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for the page to show {what}")
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def click(self, selector):
        """
        Click an element the way a person does: the mouse, at its centre.
        """
        box = yield self.evaluate(
            "(() => { const e = document.querySelector(%s); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: !!e.disabled}; })()"
            % json.dumps(selector)
        )
        if box is None:
            raise AssertionError(f"nothing on the page matches {selector}")
        if box["disabled"]:
            raise AssertionError(f"{selector} is disabled")
        yield self.send("Input.dispatchMouseEvent",
                        {"type": "mouseMoved", "x": box["x"], "y": box["y"]})
        for kind in ("mousePressed", "mouseReleased"):
            yield self.send("Input.dispatchMouseEvent", {
                "type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1,
            })

    @inlineCallbacks
    def type(self, selector, text):
        yield self.click(selector)
        yield self.send("Input.insertText", {"text": text})

    def state(self, backendID):
        return "document.querySelector('tr[data-backend-id=\"%s\"] .pill')?.textContent" % backendID


@inlineCallbacks
def openBrowser(testCase, url):
    """
    Start Chromium (stopped at the end of the test) and open C{url}.

    @return: fires with (L{Chromium}, L{Page})
    """
    executable = findChromium()
    if executable is None:
        if os.environ.get("CI"):
            raise AssertionError("chromium is missing: .ci/run should have installed it")
        raise SkipTest("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="rrbalancer-chromium-")
    testCase.addCleanup(shutil.rmtree, profile, True)
    browser = Chromium()
    reactor.spawnProcess(
        browser,
        executable,
        [executable] + CHROMIUM_FLAGS + [f"--user-data-dir={profile}", "about:blank"],
        env=dict(os.environ),
        childFDs={0: "w", 1: "r", 2: "r", 3: "w", 4: "r"},
    )

    @inlineCallbacks
    def stop():
        if browser.ended.called:
            return
        try:
            browser.send("Browser.close").addErrback(lambda f: None)
        except Exception:
            pass
        killer = reactor.callLater(10, browser.transport.signalProcess, "KILL")
        yield browser.ended
        if killer.active():
            killer.cancel()

    testCase.addCleanup(stop)
    try:
        target = yield browser.send("Target.createTarget", {"url": "about:blank"})
    except CDPError:
        raise AssertionError("chromium did not start: " + browser.stderr.decode("utf-8", "replace"))
    attached = yield browser.send(
        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
    )
    page = Page(browser, attached["sessionId"])
    yield page.send("Runtime.enable")
    yield page.send("Log.enable")
    yield page.send("Network.enable")
    yield page.send("Page.enable")
    yield page.send("Page.navigate", {"url": url})
    return browser, page


class BrowserTests(TestCase):
    """
    The dashboard in a real browser: it shows the backends, updates live,
    and its buttons and form work.
    """

    timeout = 90

    @inlineCallbacks
    def test_dashboard(self):
        settleConnections(self)
        one, oneURL = startBackend(self, "one")
        two, twoURL = startBackend(self, "two")
        three, threeURL = startBackend(self, "three")
        health = HealthConfig(interval=0.5, timeout=1.0)
        service, balancer, admin = yield startWithAdmin(
            self, balancerConfig([oneURL, twoURL], health=health)
        )
        group = service.group
        client = makeClient(self)
        for n in range(6):
            yield client.get(f"{balancer}/warm/{n}")

        browser, page = yield openBrowser(self, admin + "/")
        yield page.waitFor(
            "document.querySelectorAll('#backend-rows tr').length === 2"
            " && document.getElementById('live').dataset.live === 'ok'",
            "both backends, live",
            timeout=30,
        )
        rows = yield page.evaluate(
            "[...document.querySelectorAll('#backend-rows tr')].map(tr => ["
            " tr.dataset.backendId, tr.querySelector('.url').textContent,"
            " tr.querySelector('.pill').textContent, tr.querySelector('[data-col=weight]').textContent])"
        )
        self.assertEqual(rows, [["1", oneURL, "up", "1"], ["2", twoURL, "up", "1"]])
        total = yield page.evaluate("document.getElementById('t-requests').textContent")
        self.assertEqual(total, "6")
        self.assertTrue((yield page.evaluate("document.getElementById('discovery').hidden")))
        # Without pools there is no pool to choose, and nothing of the choice shows.
        shown = yield page.evaluate("getComputedStyle(document.getElementById('pool-field')).display")
        self.assertEqual(shown, "none")

        # The stats columns: totals, bytes and the last check of each backend.
        yield page.waitFor(
            "[...document.querySelectorAll('#backend-rows [data-col=check]')]"
            ".every(td => td.textContent.startsWith('200 · '))",
            "both backends' last checks",
        )
        stats = yield page.evaluate(
            "[...document.querySelectorAll('#backend-rows tr')].map(tr => ["
            " tr.querySelector('[data-col=requests]').textContent,"
            " tr.querySelector('[data-col=requests]').title,"
            " tr.querySelector('[data-col=bytes]').textContent])"
        )
        for requests, classes, moved in stats:
            self.assertEqual((requests, classes), ("3", "Responses: 2xx: 3"))
            self.assertRegex(moved, r"^0 B / \d+ B$")
        # A row per listener: the client one with its traffic, then the admin one.
        listeners = yield page.evaluate(
            "[...document.querySelectorAll('#listener-rows tr')].map(tr =>"
            " [...tr.querySelectorAll('td')].map(td => td.textContent))"
        )
        self.assertEqual(
            [row[:2] for row in listeners],
            [["client", balancer[len("http://"):]], ["admin", admin[len("http://"):]]],
        )
        self.assertEqual(listeners[0][4], "6")
        self.assertEqual(listeners[1][2:], ["–"] * 4)

        # The drain button drains backend 1, and the page shows it.
        yield page.click('tr[data-backend-id="1"] button[data-action="drain"]')
        yield poll(lambda: group.get("1").adminState == DRAINING, what="the drain")
        yield page.waitFor(f"{page.state(1)} === 'draining'", "backend 1 draining")
        pill = yield page.evaluate("document.querySelector('tr[data-backend-id=\"1\"] .pill').className")
        self.assertIn("draining", pill)
        reason = yield page.evaluate(
            "document.querySelector('tr[data-backend-id=\"1\"] .why').textContent"
        )
        self.assertTrue(reason.startswith("drained by 127.0.0.1:"), reason)
        disabled = yield page.evaluate(
            "document.querySelector('tr[data-backend-id=\"1\"] button[data-action=drain]').disabled"
        )
        self.assertTrue(disabled)

        # A change made elsewhere shows within 2 s, without a reload.
        marker = yield page.evaluate("window.__sameDocument = true")
        self.assertTrue(marker)
        code, _ = yield call(client, "PATCH", f"{admin}/api/backends/2", {"state": "disabled"})
        self.assertEqual(code, 200)
        changed = reactor.seconds()
        yield page.waitFor(f"{page.state(2)} === 'disabled'", "backend 2 disabled", timeout=5)
        self.assertLessEqual(reactor.seconds() - changed, 2.0)
        self.assertTrue((yield page.evaluate("window.__sameDocument === true")))

        # Enable brings them back. One at a time, as a person clicks: the
        # table redraws after each change and may move the next button.
        yield page.click('tr[data-backend-id="1"] button[data-action="enable"]')
        yield page.waitFor(f"{page.state(1)} === 'up'", "backend 1 up")
        yield page.click('tr[data-backend-id="2"] button[data-action="enable"]')
        yield poll(lambda: group.get("1").adminState == UP and group.get("2").available,
                   what="the backends to be enabled")
        yield page.waitFor(f"{page.state(1)} === 'up' && {page.state(2)} === 'up'", "both up")

        # The form adds a backend; it comes up once checked.
        yield page.type("#add-url", threeURL)
        yield page.click("#add-submit")
        yield poll(lambda: group.byURL(threeURL) is not None, what="the new backend")
        newID = group.byURL(threeURL).id
        yield page.waitFor(f"{page.state(newID)} === 'up'", "the new backend up")
        self.assertEqual((yield page.evaluate("document.getElementById('add-url').value")), "")

        # Remove asks for a second click, then removes.
        yield page.click('tr[data-backend-id="2"] button[data-action="remove"]')
        self.assertIsNotNone(group.get("2"))
        yield page.click('tr[data-backend-id="2"] button[data-action="remove"]')
        yield poll(lambda: group.get("2") is None, what="the removal")
        yield page.waitFor(
            "document.querySelector('tr[data-backend-id=\"2\"]') === null", "backend 2 gone"
        )
        count = yield page.evaluate("document.querySelectorAll('#backend-rows tr').length")
        self.assertEqual(count, 2)

        # A bad URL is refused, and the page says why.
        yield page.type("#add-url", "ftp://nowhere")
        yield page.click("#add-submit")
        message = yield page.waitFor(
            "!document.getElementById('message').hidden"
            " && document.getElementById('message').classList.contains('error')"
            " && document.getElementById('message').textContent",
            "the error",
        )
        self.assertIn("must start with http:// or https://", message)

        # Nothing went wrong in the page, and it fetched nothing from elsewhere.
        errors = [
            e for e in browser.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"
                and "400" not in e["params"]["entry"].get("text", ""))
        ]
        self.assertEqual(errors, [])
        fetched = {
            e["params"]["request"]["url"] for e in browser.events
            if e["method"] == "Network.requestWillBeSent"
        }
        self.assertTrue(fetched)
        self.assertEqual({u for u in fetched if not u.startswith(admin + "/")}, set())

    @inlineCallbacks
    def test_discoverySources(self):
        """
        A line per discovery source: its state, and what it gives or why
        it fails; none without sources.
        """
        from twisted.names import dns

        from rrbalancer.discovery import parseSource

        from .test_discovery_dns import Zone, srvRecord, startDNSServer

        settleConnections(self)
        zone = Zone(b"example.com")
        dnsPort, dnsServer = yield startDNSServer(self, zone)
        _, url = startBackend(self, "one")
        port = int(url.rsplit(":", 1)[1])
        name = "_http._tcp.web.example.com"
        zone.set(name, [srvRecord(port, "one.web.example.com")])
        zone.set("one.web.example.com", [dns.Record_A("127.0.0.1", ttl=0)])
        config = balancerConfig(
            [],
            discover=(parseSource(f"dns+srv://{name}"),),
            dnsServers=(("127.0.0.1", dnsPort),),
            dnsMinTTL=0.1,
        )
        service, _, admin = yield startWithAdmin(self, config)
        browser, page = yield openBrowser(self, admin + "/")
        line = (
            "[...document.querySelectorAll('#discovery-sources li')].map(li => ["
            " li.dataset.source, li.querySelector('.pill').textContent,"
            " li.querySelector('.detail').textContent])"
        )
        yield page.waitFor(
            "document.querySelector('#discovery-sources .pill.up') !== null"
            " && !document.getElementById('discovery').hidden",
            "the source, answering",
        )
        [(shown, state, detail)] = yield page.evaluate(line)
        self.assertEqual((shown, state), (f"dns+srv://{name}", "ok"))
        self.assertTrue(detail.startswith("1 backend · answered "), detail)

        dnsServer.failing = True
        yield page.waitFor(
            "document.querySelector('#discovery-sources .pill.down') !== null", "the source failing"
        )
        [(_, state, detail)] = yield page.evaluate(line)
        self.assertEqual(state, "failing")
        self.assertIn(": SERVFAIL · keeping 1 backend", detail)
        errors = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_pools(self):
        """
        With pools, a choice of pool: the table shows the chosen pool's
        backends, and its buttons act on that pool.
        """
        from rrbalancer.settings import parsePools

        settleConnections(self)
        _, webURL = startBackend(self, "web")
        _, apiURL = startBackend(self, "api")
        _, api2URL = startBackend(self, "api2")
        config = balancerConfig(
            [webURL], pools=parsePools([{"name": "api", "backend": [apiURL, api2URL]}]),
        )
        service, _, admin = yield startWithAdmin(self, config)
        browser, page = yield openBrowser(self, admin + "/")
        urls = "[...document.querySelectorAll('#backend-rows .url')].map(e => e.textContent)"
        yield page.waitFor(
            "document.getElementById('pool-field') !== null"
            " && !document.getElementById('pool-field').hidden"
            f" && {urls}.length === 1",
            "the pools, and the default pool's backend",
        )
        self.assertEqual((yield page.evaluate(urls)), [webURL])
        options = yield page.evaluate(
            "[...document.querySelectorAll('#pool-select option')].map(o => o.textContent)"
        )
        self.assertEqual(options, ["default (1/1 up)", "api (2/2 up)"])
        yield page.evaluate(
            "(() => { const s = document.getElementById('pool-select');"
            " s.value = 'api'; s.dispatchEvent(new Event('change')); })()"
        )
        yield page.waitFor(f"{urls}.length === 2", "the api pool's backends")
        self.assertEqual((yield page.evaluate(urls)), [apiURL, api2URL])
        yield page.click('tr[data-backend-id="2"] button[data-action="drain"]')
        api = service.pools.balancers["api"].group
        yield poll(lambda: api.get("2").adminState == DRAINING, what="the drain")
        yield page.waitFor(f"{page.state(2)} === 'draining'", "backend 2 of api draining")
        self.assertEqual(service.group.get("1").adminState, UP)
        errors = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
        self.assertEqual(errors, [])

    @inlineCallbacks
    def test_largeSet(self):
        """
        With 250 backends the page shows them a hundred at a time, the
        counts by state, and a filter; the pager pages.
        """
        settleConnections(self)
        urls = [f"http://127.0.0.1:{20000 + n}" for n in range(250)]
        service, balancer, admin = yield startWithAdmin(self, balancerConfig(urls))
        for n in (1, 2, 3):
            service.group.get(str(n)).setAdminState("draining", "test")
        browser, page = yield openBrowser(self, admin + "/")
        rows = "document.querySelectorAll('#backend-rows tr').length"
        note = "document.getElementById('page-note').textContent"
        yield page.waitFor(f"{rows} === 100 && {note} === '1–100 of 250'", "the first page")
        counts = yield page.evaluate("document.getElementById('counts').textContent")
        self.assertEqual(counts, "247 up · 0 down · 3 draining · 0 disabled")
        yield page.click("#page-next")
        yield page.waitFor(f"{note} === '101–200 of 250'", "the second page")
        first = yield page.evaluate("document.querySelector('#backend-rows tr').dataset.backendId")
        self.assertEqual(first, "101")
        yield page.evaluate(
            "(() => { const f = document.getElementById('state-filter');"
            " f.value = 'draining'; f.dispatchEvent(new Event('change')); })()"
        )
        yield page.waitFor(f"{rows} === 3 && {note} === '1–3 of 3 matching of 250'", "the draining ones")
        yield page.type("#filter", ":20002")
        yield page.waitFor(f"{rows} === 1", "one match")
        # The stats columns, and the export the footer links to.
        cells = yield page.evaluate(
            "[...document.querySelectorAll('#backend-rows tr:first-child td')]"
            ".map(td => td.dataset.col)"
        )
        self.assertTrue({"conns", "down", "tunnels"} <= set(cells), cells)
        tunnels = yield page.evaluate(
            "document.querySelector('#backend-rows tr:first-child [data-col=tunnels]').textContent"
        )
        self.assertEqual(tunnels, "0")
        down = yield page.evaluate(
            "document.querySelector('#backend-rows tr:first-child [data-col=down]').textContent"
        )
        self.assertEqual(down, "0")
        csv = yield page.evaluate(
            "fetch(document.querySelector('footer a[href*=csv]').href)"
            ".then(r => r.text())"
        )
        self.assertTrue(csv.startswith("id,url,"), csv[:80])
        self.assertEqual(len(csv.strip().splitlines()), 251)


class WorkersBrowserTests(TestCase):
    """
    The dashboard of a balancer of two real workers, served by their
    parent.
    """

    timeout = 90

    @inlineCallbacks
    def test_workers(self):
        from rrbalancer.config import BackendConfig, Config
        from rrbalancer.service import makeService

        settleConnections(self)
        _, oneURL = startBackend(self, "one")
        _, twoURL = startBackend(self, "two")
        service = makeService(
            Config(
                backends=(BackendConfig(oneURL),),
                ports=("tcp:0:interface=127.0.0.1",),
                admin="tcp:0:interface=127.0.0.1",
                health=HealthConfig(enabled=False),
                shutdownGrace=2,
                workers=2,
            ),
            reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        [listener] = [s for s in service if getattr(s, "role", None) == "admin"]
        admin = "http://" + listener.address()

        browser, page = yield openBrowser(self, admin + "/")
        yield page.waitFor(
            "document.querySelectorAll('#backend-rows tr').length === 1"
            " && document.getElementById('health-note').textContent"
            ".includes('2 of 2 workers answering')",
            "the backend, both workers answering",
            timeout=45,
        )
        title = yield page.evaluate("document.querySelector('tr[data-backend-id=\"1\"] .pill').title")
        self.assertEqual(title.splitlines()[0], "worker 1: up, 0 in flight, 0 requests")
        self.assertTrue(title.splitlines()[1].startswith("worker 2: up"), title)

        # The page's buttons and form change every worker.
        yield page.type("#add-url", twoURL)
        yield page.click("#add-submit")
        yield page.waitFor(f"{page.state(2)} === 'up'", "the new backend up")
        yield page.click('tr[data-backend-id="1"] button[data-action="drain"]')
        yield page.waitFor(f"{page.state(1)} === 'draining'", "backend 1 draining")
        client = makeClient(self)
        code, body = yield call(client, "GET", f"{admin}/api/backends/1")
        self.assertEqual([w["state"] for w in body["workers"]], ["draining", "draining"])
        code, body = yield call(client, "GET", f"{admin}/api/backends/2")
        self.assertEqual(len(body["workers"]), 2)
        errors = [e for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
        self.assertEqual(errors, [])
