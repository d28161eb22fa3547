// apigw admin page. Everything it shows comes from the admin API of the
// gateway serving it; text from the server is only ever set as textContent.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const CONFIRM_MS = 4000;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let csrfToken = null;
  let refreshTimer = null;

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function call(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    // The session cookie alone is refused for anything that changes state.
    if (csrfToken && method !== "GET") headers["X-CSRF-Token"] = csrfToken;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, (data && data.error) || `HTTP ${response.status}`);
    }
    return data;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function showError(id, message) {
    const node = $(id);
    node.textContent = message || "";
    node.hidden = !message;
  }

  // --- views --------------------------------------------------------------

  function showLogin(message) {
    csrfToken = null;
    clearInterval(refreshTimer);
    refreshTimer = null;
    $("app-view").hidden = true;
    $("session-bar").hidden = true;
    $("login-view").hidden = false;
    showError("login-error", message);
    $("master-key").focus();
  }

  function showApp(session) {
    csrfToken = session.csrf_token;
    $("login-view").hidden = true;
    $("app-view").hidden = false;
    $("session-bar").hidden = false;
    refreshStatus();
    refreshKeys();
    clearInterval(refreshTimer);
    refreshTimer = setInterval(refreshStatus, REFRESH_MS);
  }

  function sessionLost(error) {
    // 403 from the data calls: logged out elsewhere, expired, or MASTER_KEY changed.
    if (error instanceof ApiError && error.status === 403) {
      showLogin("Your session has ended. Sign in again.");
      return true;
    }
    return false;
  }

  // --- services -------------------------------------------------------------

  function rate(value) {
    if (value === null || value === undefined) return "—";
    return value < 10 ? value.toFixed(2) : value.toFixed(1);
  }

  function sparkline(history) {
    if (!history || history.length < 2) return el("span", "muted", "—");
    const width = 140;
    const height = 30;
    const top = Math.max(...history, 0.001);
    const step = width / (history.length - 1);
    const points = history.map((v, i) => {
      const x = (i * step).toFixed(1);
      const y = (height - 2 - (v / top) * (height - 4)).toFixed(1);
      return `${x},${y}`;
    });
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", 0);
    base.setAttribute("x2", width);
    base.setAttribute("y1", height - 1);
    base.setAttribute("y2", height - 1);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(base, line);
    return svg;
  }

  function serviceRow(service, periodS) {
    const row = el("tr");
    row.dataset.service = service.name;

    const name = el("td");
    name.append(el("div", "service-name", service.name));
    const limit = service.rate_limit === null ? "no rate limit"
      : `${service.rate_limit} requests per ${periodS} s`;
    name.append(el("div", "service-meta", `${service.auth ? "API key" : "public"} · ${limit}`));

    const targets = el("ul", "targets");
    for (const target of service.targets) {
      const item = el("li");
      item.dataset.target = target.url;
      const state = el("span", `badge ${target.breaker}`, target.breaker.replace("_", "-"));
      state.dataset.breaker = target.breaker;
      item.append(state, el("code", null, target.url));
      targets.append(item);
    }
    const targetCell = el("td");
    targetCell.append(targets);

    const t = service.traffic;
    const requests = el("td", "num requests", rate(t.requests_per_s));
    const errors = el("td", "num errors");
    if (t.error_ratio === null || t.error_ratio === undefined) {
      errors.textContent = t.requests_per_s === null ? "—" : "0%";
    } else {
      const percent = el("span", t.error_ratio > 0 ? "bad-number" : null,
        `${(t.error_ratio * 100).toFixed(1)}%`);
      errors.append(percent, el("span", "sub", `${rate(t.errors_per_s)}/s`));
    }
    const p99 = el("td", "num p99", t.p99_ms === null ? "—" : `${t.p99_ms.toFixed(1)} ms`);
    const spark = el("td");
    spark.append(sparkline(t.history));
    row.append(name, targetCell, requests, errors, p99, spark);
    return row;
  }

  function renderStatus(status) {
    const body = $("services").tBodies[0];
    const rows = status.services.map((s) => serviceRow(s, status.rate_period_s));
    if (!rows.length) {
      const empty = el("tr");
      const cell = el("td", "empty", "No services are configured.");
      cell.colSpan = 6;
      empty.append(cell);
      rows.push(empty);
    }
    body.replaceChildren(...rows);
    const minutes = status.window_s / 60;
    $("window").textContent = status.window_s >= 60
      ? `over the last ${minutes.toFixed(minutes < 10 ? 1 : 0)} min`
      : `over the last ${Math.round(status.window_s)} s`;
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    renderServiceChoices(status.services.map((s) => s.name));
  }

  function renderServiceChoices(names) {
    const box = $("service-choices");
    const known = [...box.querySelectorAll("input")].map((i) => i.value);
    if (known.join("\n") === names.join("\n")) return; // keep what is ticked
    const ticked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    box.replaceChildren(...names.map((name) => {
      const label = el("label");
      const box = el("input");
      box.type = "checkbox";
      box.value = name;
      box.checked = ticked.has(name);
      label.append(box, document.createTextNode(name));
      return label;
    }));
  }

  async function refreshStatus() {
    try {
      renderStatus(await call("GET", "../status"));
      showError("status-error", "");
    } catch (error) {
      if (!sessionLost(error)) showError("status-error", `Could not load the status: ${error.message}`);
    }
  }

  // --- keys -------------------------------------------------------------------

  function when(iso) {
    return iso ? iso.replace("T", " ").replace(/:\d\dZ$/, "") : "never";
  }

  function keyState(key) {
    if (key.active) return "active";
    return key.revoked_at ? "revoked" : "expired";
  }

  function revokeButton(key) {
    const button = el("button", "danger", "Revoke");
    button.type = "button";
    let armed = null;
    button.addEventListener("click", async () => {
      if (!armed) {
        // Two clicks: a stray one revokes nothing.
        button.textContent = "Confirm revoke";
        button.classList.add("confirm");
        armed = setTimeout(() => {
          armed = null;
          button.textContent = "Revoke";
          button.classList.remove("confirm");
        }, CONFIRM_MS);
        return;
      }
      clearTimeout(armed);
      button.disabled = true;
      try {
        await call("DELETE", `../keys/${encodeURIComponent(key.id)}`);
        await refreshKeys();
      } catch (error) {
        button.disabled = false;
        if (!sessionLost(error)) showError("create-error", `Could not revoke: ${error.message}`);
      }
    });
    return button;
  }

  function keyRow(key) {
    const state = keyState(key);
    const row = el("tr", key.active ? null : "inactive");
    row.dataset.keyId = key.id;
    const badge = el("span", `badge ${state}`, state);
    const action = el("td", "num");
    if (key.active) action.append(revokeButton(key));
    const stateCell = el("td");
    stateCell.append(badge);
    const prefix = el("td");
    prefix.append(el("code", null, `${key.prefix}…`));
    row.append(
      el("td", "owner", key.owner),
      prefix,
      el("td", null, key.services ? key.services.join(", ") : "all"),
      el("td", "num", key.rate_limit === null ? "service's" : String(key.rate_limit)),
      el("td", null, when(key.created_at)),
      el("td", null, when(key.expires_at)),
      stateCell,
      action,
    );
    return row;
  }

  async function refreshKeys() {
    try {
      const { keys } = await call("GET", "../keys");
      keys.reverse(); // newest first
      const rows = keys.map(keyRow);
      if (!rows.length) {
        const empty = el("tr");
        const cell = el("td", "empty", "No API keys yet.");
        cell.colSpan = 8;
        empty.append(cell);
        rows.push(empty);
      }
      $("keys").tBodies[0].replaceChildren(...rows);
      const active = keys.filter((k) => k.active).length;
      $("key-count").textContent = `${active} active, ${keys.length - active} inactive`;
    } catch (error) {
      if (!sessionLost(error)) showError("create-error", `Could not load the keys: ${error.message}`);
    }
  }

  async function createKey(event) {
    event.preventDefault();
    showError("create-error", "");
    const body = { owner: $("owner").value.trim() };
    const services = [...$("service-choices").querySelectorAll("input:checked")].map((i) => i.value);
    if (services.length) body.services = services;
    if ($("expires").value) body.expires_in = Number($("expires").value);
    if ($("rate-limit").value) body.rate_limit = Number($("rate-limit").value);
    try {
      const created = await call("POST", "../keys", body);
      $("new-key-owner").textContent = created.owner;
      $("new-key-value").value = created.api_key;
      $("copied").hidden = true;
      $("new-key").hidden = false;
      $("create-form").reset();
      await refreshKeys();
    } catch (error) {
      if (!sessionLost(error)) showError("create-error", error.message);
    }
  }

  async function copyKey() {
    const field = $("new-key-value");
    try {
      await navigator.clipboard.writeText(field.value);
    } catch (e) {
      // Without the async clipboard (an older browser, no permission).
      field.select();
      document.execCommand("copy");
    }
    $("copied").hidden = false;
  }

  function dismissKey() {
    // The raw key leaves the page: it cannot be fetched again.
    $("new-key-value").value = "";
    $("new-key").hidden = true;
  }

  // --- session ------------------------------------------------------------------

  async function login(event) {
    event.preventDefault();
    const field = $("master-key");
    try {
      const session = await call("POST", "login", { master_key: field.value });
      field.value = "";
      showError("login-error", "");
      showApp(session);
    } catch (error) {
      field.select();
      showError("login-error", error.status === 403 ? `Sign-in refused: ${error.message}.` : error.message);
    }
  }

  async function logout() {
    try {
      await call("POST", "logout");
    } finally {
      dismissKey();
      showLogin("You are signed out.");
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("login-form").addEventListener("submit", login);
    $("logout").addEventListener("click", logout);
    $("create-form").addEventListener("submit", createKey);
    $("copy").addEventListener("click", copyKey);
    $("dismiss").addEventListener("click", dismissKey);
    try {
      showApp(await call("GET", "session"));
    } catch (error) {
      showLogin(error.status === 403 && error.message !== "not logged in" ? error.message : "");
    }
  });
})();
