// hubhost console: live updates over the API's WebSocket (/api/v1/ws, the session cookie
// authenticates it), function calls and administrator actions over the REST API.
// Everything a driver made is put into the page with textContent only, never as HTML.
"use strict";

(function () {
  const body = document.body;
  const page = body.dataset.page;
  const MAX_LOG = 1000;

  // -- helpers ------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function clock(t) {
    const d = new Date(t * 1000);
    const p = (n, w) => String(n).padStart(w || 2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds()) + "." + p(d.getMilliseconds(), 3);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  // a REST call with the session cookie; resolves to {ok, status, doc}
  async function api(method, path, doc) {
    const init = { method: method, credentials: "same-origin", headers: {} };
    if (doc !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(doc);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      return { ok: false, status: 0, doc: { error: { code: "unreachable", message: "the hub did not answer: " + e } } };
    }
    let out = null;
    try { out = await r.json(); } catch (e) { out = null; }
    return { ok: r.ok, status: r.status, doc: out };
  }

  function errorText(res) {
    const err = res.doc && res.doc.error;
    return err ? err.code + ": " + err.message : "HTTP " + res.status;
  }

  // -- the WebSocket ------------------------------------------------------------------
  const live = document.getElementById("live");
  const watches = [];          // [{request, onMessage}] re-sent after every reconnect
  const byRef = new Map();     // ref -> onMessage
  const pending = new Map();   // request id -> watch
  let ws = null;
  let nextId = 1;
  let backoff = 500;

  function setLive(on) {
    if (!live) return;
    live.textContent = on ? "live" : "offline";
    live.classList.toggle("on", on);
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(proto + "//" + location.host + "/api/v1/ws");
    ws.onopen = function () {
      backoff = 500;
      setLive(true);
      byRef.clear();
      pending.clear();
      for (const w of watches) send(w);
    };
    ws.onmessage = function (ev) {
      let m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      if (m.type === "success" && pending.has(m.id)) {
        byRef.set(m.ref, pending.get(m.id).onMessage);
        pending.delete(m.id);
      } else if (m.type === "error") {
        if (pending.has(m.id)) pending.delete(m.id);
        console.warn("hubhost console:", m.code, m.message);
      } else if (m.ref !== undefined && byRef.has(m.ref)) {
        byRef.get(m.ref)(m);
      }
    };
    ws.onclose = function () {
      setLive(false);
      setTimeout(connect, backoff);
      backoff = Math.min(backoff * 2, 10000);
    };
  }

  function send(w) {
    const id = nextId++;
    pending.set(id, w);
    ws.send(JSON.stringify(Object.assign({ id: id }, w.request)));
  }

  function watch(request, onMessage) {
    const w = { request: request, onMessage: onMessage };
    watches.push(w);
    if (ws && ws.readyState === WebSocket.OPEN) send(w);
  }

  // -- log lists ----------------------------------------------------------------------
  function logItem(e) {
    const li = el("li", "lvl-" + e.level);
    li.dataset.driver = e.driver;
    li.dataset.device = e.device || "";
    li.appendChild(el("time", null, clock(e.time)));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", "lvl", e.level));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", "text", e.text));
    return li;
  }

  function appendLog(list, m) {
    if (m.missed !== undefined) {
      list.appendChild(el("li", "missed", "... " + m.missed + " records missed (this page fell behind)"));
    } else {
      list.appendChild(logItem(m.entry));
    }
    while (list.children.length > MAX_LOG) list.removeChild(list.firstChild);
  }

  // -- the hub page -------------------------------------------------------------------
  function rowOf(driverId) {
    for (const tr of document.querySelectorAll("tr[data-driver]")) {
      if (tr.dataset.driver === driverId) return tr;
    }
    return null;
  }

  function setField(scope, name, text) {
    const cell = scope.querySelector('[data-field="' + name + '"]');
    if (cell && cell.textContent !== text) cell.textContent = text;
    return cell;
  }

  function showHub(hub) {
    const c = hub.counts;
    const counts = document.getElementById("counts");
    if (counts) counts.textContent = c.running + " running, " + c.failed + " failed, " + c.restarting + " restarting";
    for (const d of hub.drivers) {
      const tr = rowOf(d.id);
      if (!tr) continue;
      const state = setField(tr, "condition", d.condition);
      if (state) state.className = "state state-" + d.condition;
      setField(tr, "restarts", String(d.restarts));
      setField(tr, "last_error", d.last_error || "");
      setField(tr, "lua_memory", bytes(d.lua_memory_bytes));
      const w = d.worker;
      setField(tr, "worker", w ? w.name + " (pid " + (w.pid || "-") + ")" : "-");
      let cpu = "-";
      if (w && w.cpu_seconds !== null) {
        cpu = w.cpu_seconds + " s" + (w.cpu_percent !== null ? ", " + w.cpu_percent + " %" : "");
      }
      setField(tr, "cpu", cpu);
      setField(tr, "rss", bytes(w ? w.rss_bytes : null));
    }
    const mirror = document.getElementById("mirror");
    if (mirror && hub.mirror) {
      setField(mirror, "connected", hub.mirror.connected ? "yes" : "NO");
      setField(mirror, "pending", String(hub.mirror.pending || 0));
      setField(mirror, "lag", (hub.mirror.lag_seconds || 0).toFixed(3) + " s");
    }
  }

  function resultFor(driverId) {
    for (const s of document.querySelectorAll(".action-result")) {
      if (s.dataset.resultFor === driverId) return s;
    }
    return null;
  }

  async function adminAction(target) {
    const action = target.dataset.action;
    const driverId = target.dataset.driver || "";
    const out = resultFor(driverId);
    let res;
    if (action === "restart") {
      res = await api("POST", "/api/v1/reload", { drivers: [driverId] });
    } else if (action === "reload") {
      res = await api("POST", "/api/v1/reload");
    } else if (action === "log-level") {
      res = await api("PUT", "/api/v1/drivers/" + encodeURIComponent(driverId) + "/log_level",
                      { level: target.value || null });
    } else {
      return;
    }
    if (out) {
      out.textContent = res.ok ? (action === "log-level" ? "log level: " + (res.doc.level || "the hub's")
                                                         : "done") : errorText(res);
      out.classList.toggle("bad", !res.ok);
    }
  }

  function setupHub() {
    watch({ type: "watch_hub" }, function (m) { showHub(m.hub); });
    for (const b of document.querySelectorAll('button[data-action]')) {
      b.addEventListener("click", function () { adminAction(b); });
    }
    for (const s of document.querySelectorAll('select[data-action]')) {
      s.addEventListener("change", function () { adminAction(s); });
    }
  }

  // -- the device page ----------------------------------------------------------------
  function showStatus(name, value) {
    const table = document.querySelector("#status tbody");
    let row = null;
    for (const tr of table.querySelectorAll("tr")) {
      if (tr.dataset.name === name) { row = tr; break; }
    }
    if (value === null) {
      if (row) row.remove();
    } else {
      if (!row) {
        row = el("tr");
        row.dataset.name = name;
        row.appendChild(el("td", "name", name));
        row.appendChild(el("td", "value"));
        table.appendChild(row);
      }
      const text = JSON.stringify(value);
      const cell = row.querySelector(".value");
      if (cell.textContent !== text) {
        cell.textContent = text;
        cell.classList.remove("changed");
        void cell.offsetWidth;          // restart the highlight
        cell.classList.add("changed");
      }
    }
    const empty = document.getElementById("status-empty");
    if (empty) empty.hidden = table.children.length > 0;
    if (name === "connected") {
      const c = document.getElementById("connected");
      c.textContent = value === true ? "connected" : value === false ? "not connected" : "unknown";
      c.parentElement.className = value === true ? "conn-yes" : value === false ? "conn-no" : "conn-unknown";
    }
  }

  // the text of a field as the JSON value sent; a number field whose text is not a
  // number goes as the text, so the hub's own check (bad_args) says what is wrong
  function fieldValue(input) {
    const text = input.value;
    const kind = input.dataset.kind;
    if (text === "") return undefined;
    if (kind === "string") return text;
    if (kind === "bool") return text === "true";
    if (kind === "int" || kind === "float") {
      const t = text.trim();
      return /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t) ? Number(t) : text;
    }
    try { return JSON.parse(text); } catch (e) { return text; }
  }

  // bad_args messages name the argument: "...: argument 'celsius' must be Float64, ..."
  function fieldNamed(message) {
    const m = /(?:argument|parameter) '([^']+)'/.exec(message || "");
    return m ? m[1] : null;
  }

  async function callFunction(form) {
    const deviceId = body.dataset.device;
    const fn = form.dataset.function;
    const args = {};
    for (const input of form.querySelectorAll("[data-kind]")) {
      const v = fieldValue(input);
      if (v !== undefined) args[input.name] = v;
    }
    for (const s of form.querySelectorAll(".field-error")) s.textContent = "";
    const callError = form.querySelector(".call-error");
    const result = form.querySelector(".call-result");
    callError.textContent = "";
    result.hidden = true;
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    const res = await api("POST", "/api/v1/devices/" + encodeURIComponent(deviceId) + "/functions/" +
                          encodeURIComponent(fn), args);
    if (button) button.disabled = false;
    if (res.ok) {
      result.textContent = JSON.stringify(res.doc.result, null, 2);
      result.hidden = false;
      return;
    }
    const err = res.doc && res.doc.error;
    const name = err && err.code === "bad_args" ? fieldNamed(err.message) : null;
    if (name !== null) {
      for (const f of form.querySelectorAll(".field")) {
        if (f.dataset.param === name) {
          f.querySelector(".field-error").textContent = err.message;
          return;
        }
      }
    }
    callError.textContent = errorText(res);
  }

  function setupDevice() {
    const deviceId = body.dataset.device;
    watch({ type: "watch_device", device: deviceId }, function (m) { showStatus(m.name, m.value); });
    const list = document.getElementById("log");
    watch({ type: "watch_logs", device: deviceId }, function (m) { appendLog(list, m); });
    for (const form of document.querySelectorAll("form.function")) {
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        if (!form.classList.contains("disabled")) callFunction(form);
      });
    }
  }

  // -- the logs page ------------------------------------------------------------------
  function setupLogs() {
    const req = { type: "watch_logs" };
    if (body.dataset.fDriver) req.driver = body.dataset.fDriver;
    if (body.dataset.fDevice) req.device = body.dataset.fDevice;
    if (body.dataset.fLevel) req.level = body.dataset.fLevel;
    const list = document.getElementById("log");
    watch(req, function (m) { appendLog(list, m); });
    for (const s of document.querySelectorAll("select[data-autosubmit]")) {
      s.addEventListener("change", function () { s.form.submit(); });
    }
  }

  if (page === "hub") setupHub();
  else if (page === "device") setupDevice();
  else if (page === "logs") setupLogs();
  if (page === "hub" || page === "device" || page === "logs") connect();
})();
