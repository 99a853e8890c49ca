// rrbalancer dashboard: polls the admin API every second and updates the
// page in place (no reload, no framework, nothing fetched from elsewhere).
"use strict";

(function () {
  const POLL_MS = 1000;
  const PAGE = 100; // rows shown at once: the page stays light with 10,000 backends
  const TIMEOUT_MS = 3000;
  const CONFIRM_MS = 4000;

  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // backend id -> row elements
  let serverSkew = 0; // server clock minus ours, in seconds
  let offset = 0; // first row of the page shown
  let pool = null; // the pool whose backends are shown; null: the default, without pools
  let timer = null;
  let messageTimer = null;

  // -- the API --------------------------------------------------------------

  async function api(method, path, body) {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), TIMEOUT_MS);
    const options = { method, cache: "no-store", credentials: "same-origin", signal: controller.signal, headers: {} };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    try {
      const response = await fetch(path, options);
      if (response.status === 204) return null;
      let data = null;
      try { data = await response.json(); } catch (e) { data = null; }
      if (!response.ok) {
        throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
      }
      return data;
    } catch (e) {
      if (e.name === "AbortError") throw new Error("no answer from the balancer");
      throw e;
    } finally {
      clearTimeout(timeout);
    }
  }

  // -- formatting -----------------------------------------------------------

  function fmtRate(value) {
    if (value === null || value === undefined) return "–";
    if (value === 0) return "0";
    return value < 10 ? value.toFixed(1) : Math.round(value).toLocaleString();
  }

  function fmtMs(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return value.toFixed(2) + " ms";
    if (value < 100) return value.toFixed(1) + " ms";
    if (value < 10000) return Math.round(value) + " ms";
    return (value / 1000).toFixed(1) + " s";
  }

  function fmtPercent(fraction) {
    if (!fraction) return "0%";
    const p = fraction * 100;
    return (p < 10 ? p.toFixed(1) : Math.round(p)) + "%";
  }

  function fmtBytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i && n < 10 ? n.toFixed(1) : Math.round(n)) + " " + units[i];
  }

  function fmtDuration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return seconds + "s";
    const m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + "m " + s + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h " + (m % 60) + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function fmtClock(epoch) {
    return new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
  }

  function serverNow() {
    return Date.now() / 1000 + serverSkew;
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  // -- messages -------------------------------------------------------------

  function showMessage(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.className = isError ? "message error" : "message";
    box.hidden = false;
    clearTimeout(messageTimer);
    messageTimer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 4000);
  }

  function setLive(ok, detail) {
    const live = $("live");
    live.dataset.live = ok ? "ok" : "lost";
    setText($("live-text"), ok ? "Live · updated " + fmtClock(Date.now() / 1000) : "Disconnected: " + detail + " · retrying");
  }

  // -- the backends table ---------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const SPARK_W = 120, SPARK_H = 26;
  const HISTORY_SLOTS = 30; // 5 minutes in 10-second steps, as the API keeps

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function button(action, label, className) {
    const b = el("button", className || "", label);
    b.type = "button";
    b.dataset.action = action;
    return b;
  }

  function makeRow(backend) {
    const tr = document.createElement("tr");
    tr.dataset.backendId = backend.id;
    const cells = {};
    const add = (name, className) => { const td = el("td", className); td.dataset.col = name; tr.appendChild(td); cells[name] = td; return td; };

    cells.pill = el("span", "pill state");
    add("state").appendChild(cells.pill);

    const who = add("backend", "backend");
    cells.url = el("div", "url");
    cells.sub = el("div", "sub");
    who.append(cells.url, cells.sub);

    for (const name of ["weight", "active", "tunnels", "conns", "rps", "requests", "bytes",
      "errors", "p50", "p99", "check", "down"]) add(name, "num");

    const spark = document.createElementNS(SVG, "svg");
    spark.setAttribute("class", "spark");
    spark.setAttribute("width", SPARK_W);
    spark.setAttribute("height", SPARK_H);
    spark.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
    spark.setAttribute("role", "img");
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("class", "base");
    base.setAttribute("x1", 0);
    base.setAttribute("x2", SPARK_W);
    base.setAttribute("y1", SPARK_H - 0.5);
    base.setAttribute("y2", SPARK_H - 0.5);
    spark.appendChild(base);
    cells.sparkTitle = document.createElementNS(SVG, "title");
    cells.sparkArea = document.createElementNS(SVG, "polygon");
    cells.sparkArea.setAttribute("class", "area");
    cells.sparkLine = document.createElementNS(SVG, "polyline");
    cells.sparkLine.setAttribute("class", "line");
    cells.sparkErrors = document.createElementNS(SVG, "g");
    spark.append(cells.sparkTitle, cells.sparkArea, cells.sparkLine, cells.sparkErrors);
    add("history").appendChild(spark);

    const change = add("change", "change");
    cells.when = el("div", "when");
    cells.why = el("div", "why");
    change.append(cells.when, cells.why);

    const actions = add("actions", "actions");
    cells.buttons = {
      drain: button("drain", "Drain"),
      disable: button("disable", "Disable"),
      enable: button("enable", "Enable"),
      remove: button("remove", "Remove", "danger"),
    };
    for (const b of Object.values(cells.buttons)) actions.appendChild(b);

    return { tr, cells, backend };
  }

  function drawSpark(cells, history) {
    const n = history.length;
    if (!n) return;
    // A fixed time axis: a backend newer than the chart fills its right end.
    const step = SPARK_W / (HISTORY_SLOTS - 1);
    const x0 = (HISTORY_SLOTS - n) * step;
    const peak = Math.max(1, ...history.map((p) => p.rps));
    const y = (v) => (SPARK_H - 2 - (v / peak) * (SPARK_H - 4)).toFixed(1);
    const points = history.map((p, i) => `${(x0 + i * step).toFixed(1)},${y(p.rps)}`);
    cells.sparkLine.setAttribute("points", points.join(" "));
    cells.sparkArea.setAttribute("points", `${x0.toFixed(1)},${SPARK_H} ${points.join(" ")} ${SPARK_W},${SPARK_H}`);
    const errorBars = [];
    history.forEach((p, i) => {
      if (p.errors > 0) {
        const h = Math.max(2, (p.errors / peak) * (SPARK_H - 4));
        errorBars.push([x0 + i * step - 1, SPARK_H - h, h]);
      }
    });
    const g = cells.sparkErrors;
    while (g.firstChild) g.removeChild(g.firstChild);
    for (const [x, top, h] of errorBars) {
      const r = document.createElementNS(SVG, "rect");
      r.setAttribute("class", "err");
      r.setAttribute("x", Math.max(0, x).toFixed(1));
      r.setAttribute("y", top.toFixed(1));
      r.setAttribute("width", "2");
      r.setAttribute("height", h.toFixed(1));
      g.appendChild(r);
    }
    const last = history[n - 1];
    setText(cells.sparkTitle, `Requests/s over the last ${fmtDuration(n * 10)} (peak ${fmtRate(peak)}, last ${fmtRate(last.rps)})`);
  }

  function updateRow(row, b) {
    const c = row.cells;
    row.backend = b;
    const stateText = b.removing ? "removing" : b.state;
    c.pill.className = "pill state " + b.state;
    setText(c.pill, stateText);
    row.tr.dataset.state = b.state;

    setText(c.url, b.url);
    let sub = "#" + b.id;
    if (b.backup) sub += " · backup";
    if (b.last_error && (b.state === "down" || b.state === "ejected")) sub += " · " + b.last_error;
    if (b.weight_ramp < 1) sub += ` · slow start ${Math.round(b.weight_ramp * 100)}%`;
    for (const [k2, v] of Object.entries(b.policy || {})) sub += ` · ${k2} ${v}`;
    // With several workers, each has its own health view: say where they differ.
    const views = b.workers || [];
    if (views.some((w) => w.state !== b.state || w.state !== views[0].state)) {
      sub += " · workers: " + views.map((w) => `${w.worker} ${w.state}`).join(", ");
    }
    c.pill.title = views.length
      ? views.map((w) => `worker ${w.worker}: ${w.state}, ${w.active} in flight, ${w.requests} requests`).join("\n")
      : "";
    setText(c.sub, sub);
    c.sub.title = b.last_error ? "Last error: " + b.last_error : "";

    setText(c.weight, String(b.weight));
    setText(c.active, String(b.active));
    setText(c.tunnels, String(b.tunnels || 0));
    c.tunnels.title = b.tunnels_total ? `${b.tunnels_total} opened; ${fmtBytes(b.tunnel_bytes_to_backend)} to the backend, ${fmtBytes(b.tunnel_bytes_to_client)} to clients` : "";
    setText(c.rps, fmtRate(b.requests_per_second));
    setText(c.errors, fmtPercent(b.error_rate));
    c.errors.classList.toggle("bad", b.error_rate >= 0.05);
    setText(c.p50, fmtMs(b.latency_ms.p50));
    setText(c.p99, fmtMs(b.latency_ms.p99));
    const k = b.connections;
    setText(c.conns, k ? `${k.open}${k.limit ? " / " + k.limit : ""}${k.queue ? " +" + k.queue : ""}` : "–");
    c.conns.title = k ? `${k.open} open, ${k.idle} idle, limit ${k.limit || "none"}; ${k.queue} waiting (peak ${k.queue_peak}); peak in flight ${b.peak_active}` : "";
    setText(c.down, b.times_down ? `${b.times_down}× · ${fmtDuration(b.downtime)}` : "0");
    const classes = Object.entries(b.responses || {}).sort().map(([k2, v]) => `${k2}: ${v}`).join(", ");
    setText(c.requests, String(b.requests));
    c.requests.title = classes ? "Responses: " + classes : "";
    setText(c.bytes, `${fmtBytes(b.bytes_in)} / ${fmtBytes(b.bytes_out)}`);
    const checked = b.last_check_code !== null && b.last_check_code !== undefined;
    setText(c.check, checked ? `${b.last_check_code} · ${fmtMs(b.last_check_ms)}` : "–");
    c.check.title = b.last_check ? "Checked at " + new Date(b.last_check * 1000).toLocaleTimeString() : "";
    drawSpark(c, b.history || []);

    setText(c.when, fmtDuration(serverNow() - b.last_change) + " ago");
    c.when.title = new Date(b.last_change * 1000).toLocaleString();
    setText(c.why, b.last_change_reason || "");
    c.why.title = b.last_change_reason || "";

    const admin = b.state === "draining" || b.state === "disabled" ? b.state : "up";
    const busy = row.busy || b.removing;
    const btn = c.buttons;
    btn.drain.disabled = busy || admin === "draining";
    btn.disable.disabled = busy || admin === "disabled";
    btn.enable.disabled = busy || admin === "up";
    btn.remove.disabled = busy;
    for (const [action, element] of Object.entries(btn)) {
      element.setAttribute("aria-label", `${element.textContent} backend ${b.url}`);
      element.dataset.action = action;
    }
  }

  function renderBackends(list) {
    const tbody = $("backend-rows");
    const seen = new Set();
    for (const b of list) {
      seen.add(b.id);
      let row = rows.get(b.id);
      if (!row) {
        row = makeRow(b);
        rows.set(b.id, row);
      }
      updateRow(row, b);
      tbody.appendChild(row.tr); // keeps the API's order; a no-op when in place
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    $("empty").hidden = list.length > 0;
  }

  function backendsQuery() {
    const query = new URLSearchParams({ offset: String(offset), limit: String(PAGE) });
    const text = $("filter").value.trim();
    if (text) query.set("q", text);
    const state = $("state-filter").value;
    if (state) query.set("state", state);
    if (pool !== null) query.set("pool", pool);
    return "api/backends?" + query.toString();
  }

  function inPool() {
    return pool === null ? "" : "?pool=" + encodeURIComponent(pool);
  }

  // With pools, a choice of the pool whose backends the table shows.
  function renderPools(pools) {
    const names = pools.map((p) => p.name);
    $("pool-field").hidden = names.length < 2;
    if (names.length < 2) {
      pool = null;
      return;
    }
    const select = $("pool-select");
    if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
      select.replaceChildren(...pools.map((p) => {
        const option = el("option", "", `${p.name} (${p.up}/${p.backends} up)`);
        option.value = p.name;
        return option;
      }));
    } else {
      pools.forEach((p, i) => setText(select.options[i], `${p.name} (${p.up}/${p.backends} up)`));
    }
    if (pool === null || !names.includes(pool)) choosePool(names[0]);
    select.value = pool;
  }

  function choosePool(name) {
    pool = name;
    offset = 0;
    for (const row of rows.values()) row.tr.remove();
    rows.clear(); // ids are each pool's own
  }

  $("pool-select").addEventListener("change", () => { choosePool($("pool-select").value); refresh(); });

  function renderPager(list) {
    const c = list.counts;
    setText($("counts"), `${c.up} up · ${c.down} down${c.ejected ? ` · ${c.ejected} ejected` : ""} · ${c.draining} draining · ${c.disabled} disabled`);
    const first = list.matched ? list.offset + 1 : 0;
    const last = list.offset + list.backends.length;
    const of = list.matched === list.total ? `${list.total}` : `${list.matched} matching of ${list.total}`;
    setText($("page-note"), `${first}–${last} of ${of}`);
    $("page-prev").disabled = list.offset === 0;
    $("page-next").disabled = last >= list.matched;
    $("pager").hidden = list.total <= PAGE && !$("filter").value && !$("state-filter").value;
    if (list.offset > 0 && list.backends.length === 0) {
      // The page emptied (backends removed): show the last one there is.
      offset = Math.max(0, Math.floor((list.matched - 1) / PAGE) * PAGE);
      refresh();
    }
  }

  $("page-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
  $("page-next").addEventListener("click", () => { offset += PAGE; refresh(); });
  $("filter").addEventListener("input", () => { offset = 0; refresh(); });
  $("state-filter").addEventListener("change", () => { offset = 0; refresh(); });

  const SOURCE_PILLS = { ok: "up", failing: "down", starting: "draining" };

  function describeSource(s, now) {
    const backends = `${s.backends} backend${s.backends === 1 ? "" : "s"}`;
    if (s.state === "failing") {
      const kept = s.last_answer === null ? "no answer yet" : `keeping ${backends}`;
      return `failing for ${fmtDuration(now - s.since)}: ${s.last_error} · ${kept}`;
    }
    if (s.state === "starting") return "waiting for its first answer";
    return `${backends} · answered ${fmtDuration(now - s.last_answer)} ago`;
  }

  // One line per discovery source; there are few, so the list is drawn anew.
  function renderDiscovery(sources, now) {
    $("discovery").hidden = sources.length === 0;
    $("discovery-sources").replaceChildren(...sources.map((s) => {
      const li = el("li", "source");
      li.dataset.source = s.url;
      li.append(
        el("span", "pill " + (SOURCE_PILLS[s.state] || "disabled"), s.state),
        el("span", "url", s.url),
        el("span", "muted detail", describeSource(s, now)),
      );
      return li;
    }));
  }

  // A row per listener, as HAProxy's frontends; the admin listener's own
  // traffic is not counted, so its figures are left blank.
  function renderListeners(listeners, admin) {
    const row = (role, l) => {
      const tr = el("tr");
      tr.dataset.role = role;
      const counted = role === "client";
      const cells = [
        el("td", "", role),
        el("td", "url", l.address || l.description),
        el("td", "num", counted ? String(l.connections) : "–"),
        el("td", "num", counted ? String(l.connections_total) : "–"),
        el("td", "num", counted ? String(l.requests_total) : "–"),
        el("td", "num", counted ? fmtRate(l.requests_per_second) : "–"),
      ];
      ["role", "address", "connections", "accepted", "requests", "rps"].forEach((name, i) => { cells[i].dataset.col = name; });
      tr.append(...cells);
      return tr;
    };
    const rowsNow = listeners.map((l) => row("client", l));
    if (admin) rowsNow.push(row("admin", admin));
    $("listener-rows").replaceChildren(...rowsNow);
  }

  function renderStatus(status) {
    setText($("version"), "v" + status.version);
    const t = status.totals;
    setText($("t-up"), `${t.available} / ${t.backends}`);
    setText($("t-rps"), fmtRate(t.requests_per_second));
    setText($("t-active"), String(t.active));
    setText($("t-requests"), t.requests.toLocaleString());
    setText($("t-retries"), t.retries.toLocaleString());
    setText($("t-uptime"), fmtDuration(status.uptime));
    const h = status.health_checks;
    let note = h.enabled
      ? `Health checks: GET ${h.path} every ${h.interval}s (up after ${h.rise}, down after ${h.fall})`
      : "Health checks are off";
    note += ` · balancing by ${status.balance}`;
    const q = status.queue;
    if (q) note += ` · queue ${q.waiting}/${q.size} (peak ${q.peak}; ${q.rejected} refused, ${q.timeouts} timed out)`;
    const e = status.ejection;
    if (e && e.ejected) note += ` · ${e.ejected} ejected`;
    if (status.panic && status.panic.active) note += ` · PANIC: under ${status.panic.threshold}% of the primaries up, balancing over all of them`;
    const workers = status.workers;
    if (workers) note += ` · ${workers.filter((w) => w.answering).length} of ${workers.length} workers answering`;
    setText($("health-note"), note);
    renderListeners(status.listeners, status.admin);
    setText($("config-path"), status.config ? "Config: " + status.config : "");
    renderDiscovery(status.discovery || [], status.now);
    renderPools(status.pools || []);
    document.title = `rrbalancer · ${t.available}/${t.backends} up`;
  }

  // -- polling --------------------------------------------------------------

  let generation = 0; // only the newest refresh's answer is shown

  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    const asked = pool;
    try {
      const [status, list] = await Promise.all([api("GET", "api/status"), api("GET", backendsQuery())]);
      if (mine !== generation) return;
      serverSkew = list.now - Date.now() / 1000;
      renderStatus(status);
      if (pool === asked) { // else the status chose a pool: its backends come next
        renderBackends(list.backends);
        renderPager(list);
      }
      setLive(true);
    } catch (e) {
      if (mine === generation) setLive(false, e.message);
    } finally {
      if (mine === generation) timer = setTimeout(refresh, pool === asked ? POLL_MS : 0);
    }
  }

  // -- actions --------------------------------------------------------------

  const ACTIONS = {
    drain: (id) => api("PATCH", `api/backends/${encodeURIComponent(id)}${inPool()}`, { state: "draining" }),
    disable: (id) => api("PATCH", `api/backends/${encodeURIComponent(id)}${inPool()}`, { state: "disabled" }),
    enable: (id) => api("PATCH", `api/backends/${encodeURIComponent(id)}${inPool()}`, { state: "up" }),
    remove: (id) => api("DELETE", `api/backends/${encodeURIComponent(id)}${inPool()}`),
  };
  const DONE = { drain: "is draining", disable: "is disabled", enable: "is enabled", remove: "is being removed" };

  async function act(row, action, element) {
    const url = row.backend.url;
    if (action === "remove" && !element.classList.contains("confirm")) {
      element.classList.add("confirm");
      element.textContent = "Confirm";
      setTimeout(() => { element.classList.remove("confirm"); element.textContent = "Remove"; }, CONFIRM_MS);
      return;
    }
    row.busy = true;
    updateRow(row, row.backend);
    try {
      await ACTIONS[action](row.backend.id);
      showMessage(`${url} ${DONE[action]}.`, false);
    } catch (e) {
      showMessage(`Could not ${action} ${url}: ${e.message}`, true);
    } finally {
      row.busy = false;
      refresh();
    }
  }

  $("backend-rows").addEventListener("click", (event) => {
    const element = event.target.closest("button[data-action]");
    if (!element || element.disabled) return;
    const row = rows.get(element.closest("tr").dataset.backendId);
    if (row) act(row, element.dataset.action, element);
  });

  $("add-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const url = $("add-url").value.trim();
    const weight = Number($("add-weight").value);
    const backup = $("add-backup").checked;
    const submit = $("add-submit");
    submit.disabled = true;
    try {
      const body = { url, weight, backup };
      if (pool !== null) body.pool = pool;
      const added = await api("POST", "api/backends", body);
      showMessage(`Added ${added.url} (#${added.id}).`, false);
      $("add-url").value = "";
      $("add-weight").value = "1";
      $("add-backup").checked = false;
    } catch (e) {
      showMessage(`Could not add ${url || "the backend"}: ${e.message}`, true);
    } finally {
      submit.disabled = false;
      refresh();
    }
  });

  refresh();
})();
