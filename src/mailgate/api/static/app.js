// mailgate admin center: a thin page over the REST API. Every action is a cmdlet call
// (POST /api/cmdlets/<Name>), so the page enforces no rule of its own: the management
// core validates, and its error text is shown as it is.
"use strict";

const TOKEN_KEY = "mailgate-admin-token";
const POLL_MS = 2000;
const CHART_POINTS = 90;
const COLOURS = ["#0a5cc2", "#c2410a", "#1e7a34", "#7a1e6c", "#a08a00", "#0a8a8a", "#5b6470", "#b3261e"];

let pollTimer = null;
const queueHistory = new Map();   // queue identity -> [{t, count}], kept while the page is open

// ---- the API ---------------------------------------------------------------------------------
class ApiError extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "") },
                                options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    showLogin("The admin token was not accepted.");
    throw new ApiError("not signed in");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new ApiError(body.error || body.detail || ("HTTP " + response.status));
  }
  return body;
}

async function cmdlet(name, params = {}) {
  const result = await api("/api/cmdlets/" + name, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
  });
  if (result.errors && result.errors.length) throw new ApiError(result.errors.join("\n"));
  if (result.warnings && result.warnings.length) notify("info", result.warnings.map(w => "WARNING: " + w).join("\n"));
  return result.output;
}

// ---- small DOM helpers (text only: values from the network never become markup) ----------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// Times come from the API in ISO 8601 with their offset; they are shown in the reader's local time and format.
const ISO_TIME = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)$/;

function show(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "string" && ISO_TIME.test(value)) return new Date(value).toLocaleString();
  if (Array.isArray(value)) return value.map(show).join(", ");
  if (typeof value === "object") return Object.values(value).map(show).join(" ");
  if (typeof value === "boolean") return value ? "True" : "False";
  return String(value);
}

function table(rows, columns, actions) {
  const head = el("tr", {}, columns.map(c => el("th", {}, c)), actions ? el("th", {}, "") : null);
  const body = rows.length ? rows.map(row => el("tr", { "data-identity": show(row.Identity) },
      columns.map(c => el("td", { class: c === "Status" ? "status-" + show(row[c]) : "" }, show(row[c]))),
      actions ? el("td", {}, actions(row)) : null))
    : [el("tr", {}, el("td", { class: "empty", colspan: columns.length + (actions ? 1 : 0) }, "None"))];
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

function notify(kind, text) {
  const banner = document.getElementById("banner");
  banner.className = kind;
  banner.textContent = text;
  banner.hidden = !text;
}

function form(fields, submitLabel, onSubmit) {
  const inputs = fields.map(f => f.options
    ? el("select", { name: f.name }, f.options.map(o => el("option", { value: o }, o)))
    : el("input", { name: f.name, placeholder: f.placeholder || "", type: f.type || "text" }));
  const node = el("form", { class: "inline" },
    fields.map((f, i) => el("label", {}, f.label || f.name, inputs[i])), el("button", { type: "submit" }, submitLabel));
  node.addEventListener("submit", async event => {
    event.preventDefault();
    const values = {};
    fields.forEach((f, i) => { if (inputs[i].value !== "") values[f.name] = f.list ? inputs[i].value.split(/\s*,\s*/) : inputs[i].value; });
    await guarded(() => onSubmit(values));
  });
  return node;
}

async function guarded(action) {
  try {
    notify("", "");
    await action();
  } catch (error) {
    if (!(error instanceof ApiError && error.message === "not signed in")) notify("error", error.message);
  }
}

function button(label, action, plain = true) {
  return el("button", { type: "button", class: plain ? "plain" : "", onclick: () => guarded(action) }, label);
}

// ---- views -----------------------------------------------------------------------------------
// A list of objects with a form for New-<noun> and a Remove button calling Remove-<noun>.
function objectView({ title, noun, label, fields, columns }) {
  return async view => {
    const rows = await cmdlet("Get-" + noun);
    view.append(el("h2", {}, title),
      form(fields, "New " + label, async values => {
        await cmdlet("New-" + noun, values);
        await route();
      }),
      table(rows, columns, row => button("Remove", async () => {
        if (!confirm("Remove " + label + " " + row.Name + "?")) return;
        await cmdlet("Remove-" + noun, { Identity: row.Name });
        await route();
      })));
  };
}

const views = {
  async overview(view) {
    const status = await api("/api/status");
    const cards = el("div", { class: "cards" },
      [["Workers", status.workers || 1], ["Open sessions", status.sessions], ["Received", status.received],
       ["Delivered", status.delivered], ["Failed", status.failed]]
        .map(([name, value]) => el("div", { class: "card" }, el("b", {}, show(value)), name)));
    const listeners = (status.listeners || []).map(l => ({ EndPoint: l.endpoint, Listening: l.listening, Error: l.error }));
    view.append(el("h2", {}, "Server " + show(status.server)), cards, el("h3", {}, "Listeners"),
                table(listeners, ["EndPoint", "Listening", "Error"]));
  },

  async receive(view) {
    const rows = await cmdlet("Get-ReceiveConnector");
    view.append(el("h2", {}, "Receive connectors"),
      table(rows, ["Identity", "Bindings", "RemoteIPRanges", "PermissionGroups", "AuthMechanism", "RequireTLS",
                   "ProtocolLoggingLevel", "Enabled"],
            row => button(row.Enabled ? "Disable" : "Enable", async () => {
              await cmdlet("Set-ReceiveConnector", { Identity: row.Identity, Enabled: !row.Enabled });
              await route();
            })));
  },

  async send(view) {
    const rows = await cmdlet("Get-SendConnector");
    view.append(el("h2", {}, "Send connectors"),
      table(rows, ["Identity", "AddressSpaces", "SmartHosts", "DNSRoutingEnabled", "SmartHostAuthMechanism",
                   "RequireTLS", "TlsAuthLevel", "Enabled"],
            row => button(row.Enabled ? "Disable" : "Enable", async () => {
              await cmdlet("Set-SendConnector", { Identity: row.Identity, Enabled: !row.Enabled });
              await route();
            })));
  },

  domains: objectView({
    title: "Accepted domains", noun: "AcceptedDomain", label: "accepted domain",
    fields: [{ name: "Name" }, { name: "DomainName", placeholder: "contoso.com" },
             { name: "DomainType", options: ["Authoritative", "InternalRelay", "ExternalRelay"] }],
    columns: ["Name", "DomainName", "DomainType", "Default"],
  }),

  mailboxes: objectView({
    title: "Mailboxes", noun: "Mailbox", label: "mailbox",
    fields: [{ name: "Name" }, { name: "PrimarySmtpAddress", placeholder: "user@contoso.com" }],
    columns: ["Name", "Alias", "PrimarySmtpAddress", "EmailAddresses"],
  }),

  async queues(view) {
    const heading = el("h2", {}, "Queues");
    const chart = el("div", { id: "queue-chart" });
    const list = el("div", { id: "queue-list" });
    const messages = el("div", { id: "queue-messages" });
    view.append(heading, chart, list, messages);
    const refresh = async () => {
      const rows = await cmdlet("Get-Queue");
      const now = Date.now();
      for (const row of rows) {
        const history = queueHistory.get(row.Identity) || [];
        history.push({ t: now, count: row.MessageCount });
        queueHistory.set(row.Identity, history.slice(-CHART_POINTS));
      }
      chart.replaceChildren(drawChart(rows.map(r => r.Identity)));
      list.replaceChildren(table(rows, ["Identity", "DeliveryType", "Status", "MessageCount", "Velocity",
                                        "NextHopDomain", "NextRetryTime", "LastError"],
        row => [button("Messages", () => showMessages(messages, row.Identity)),
                row.Status === "Suspended"
                  ? button("Resume", async () => { await cmdlet("Resume-Queue", { Identity: row.Identity }); await refresh(); })
                  : button("Suspend", async () => { await cmdlet("Suspend-Queue", { Identity: row.Identity }); await refresh(); }),
                button("Retry", async () => { await cmdlet("Retry-Queue", { Identity: row.Identity }); await refresh(); })]));
    };
    await refresh();
    pollTimer = setInterval(() => guarded(refresh), POLL_MS);
  },

  async trace(view) {
    const results = el("div", { id: "trace-results" });
    view.append(el("h2", {}, "Message trace"),
      form([{ name: "Sender" }, { name: "Recipients", list: true, placeholder: "a@contoso.com, b@contoso.com" },
            { name: "MessageSubject" }, { name: "MessageId" },
            { name: "EventId", options: ["", "RECEIVE", "SUBMIT", "RESOLVE", "EXPAND", "SEND", "DELIVER", "DEFER",
                                         "FAIL", "DSN", "POISONMESSAGE", "DROP", "REDIRECT", "TRANSFER"] },
            { name: "Start", type: "datetime-local" }, { name: "End", type: "datetime-local" }],
           "Search", async values => {
             values.ResultSize = 1000;
             const rows = await cmdlet("Get-MessageTrackingLog", values);
             results.replaceChildren(el("p", {}, rows.length + " event(s)"),
               table(rows, ["Timestamp", "EventId", "Source", "Sender", "Recipients", "MessageSubject",
                            "ConnectorId", "RecipientStatus"]));
           }),
      results);
  },

  async test(view) {
    const result = el("div", { id: "test-result" });
    view.append(el("h2", {}, "Test mail flow"),
      el("p", {}, "Sends a probe from the system mailbox and waits until it is delivered or sent on."),
      form([{ name: "TargetEmailAddress", placeholder: "admin@contoso.com" }], "Test-Mailflow", async values => {
        result.replaceChildren(el("p", {}, "Testing…"));
        const rows = await cmdlet("Test-Mailflow", values);
        result.replaceChildren(table(rows, ["TestMailflowResult", "MessageLatencyTime", "IsRemoteTest"]));
        result.querySelectorAll("td:first-child").forEach(td => td.classList.add("result-" + td.textContent));
      }),
      result,
      el("h3", {}, "Receive connector bindings"),
      form([], "Test-SmtpConnectivity", async () => {
        const rows = await cmdlet("Test-SmtpConnectivity");
        connectivity.replaceChildren(table(rows, ["ReceiveConnector", "Binding", "EndPoint", "StatusCode", "Details"]));
      }));
    const connectivity = el("div", { id: "connectivity-result" });
    view.append(connectivity);
  },
};

function drawChart(identities) {
  const width = 900, height = 220, pad = 30;
  const series = identities.map(id => queueHistory.get(id) || []);
  const max = Math.max(1, ...series.flat().map(p => p.count));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("aria-label", "Messages per queue over time");
  const axis = document.createElementNS(ns, "text");
  axis.setAttribute("x", 4); axis.setAttribute("y", pad - 8);
  axis.textContent = "messages (max " + max + ")";
  svg.append(axis);
  series.forEach((points, i) => {
    if (!points.length) return;
    const line = document.createElementNS(ns, "polyline");
    const step = (width - 2 * pad) / (CHART_POINTS - 1);
    const offset = CHART_POINTS - points.length;
    line.setAttribute("points", points.map((p, j) =>
      `${pad + (offset + j) * step},${height - pad - (p.count / max) * (height - 2 * pad)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLOURS[i % COLOURS.length]);
    line.setAttribute("stroke-width", 2);
    line.setAttribute("data-queue", identities[i]);
    svg.append(line);
  });
  const legend = el("div", { class: "legend" }, identities.map((id, i) =>
    el("span", {}, el("i", { style: "background:" + COLOURS[i % COLOURS.length] }), id)));
  return el("div", {}, svg, legend);
}

async function showMessages(target, queue) {
  const rows = await cmdlet("Get-Message", { Queue: queue });
  target.replaceChildren(el("h3", {}, "Messages in " + queue),
    table(rows, ["Identity", "FromAddress", "Status", "Size", "Subject", "LastError"],
          row => [button("Suspend", async () => { await cmdlet("Suspend-Message", { Identity: row.Identity }); await showMessages(target, queue); }),
                  button("Resume", async () => { await cmdlet("Resume-Message", { Identity: row.Identity }); await showMessages(target, queue); }),
                  button("Remove", async () => {
                    if (!confirm("Remove message " + row.Identity + " without a report?")) return;
                    await cmdlet("Remove-Message", { Identity: row.Identity, WithNDR: false });
                    await showMessages(target, queue);
                  })]));
}

// ---- navigation --------------------------------------------------------------------------------
function showLogin(message) {
  document.getElementById("login").hidden = false;
  document.getElementById("view").hidden = true;
  document.getElementById("logout").hidden = true;
  if (message) notify("error", message);
}

async function route() {
  if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin("");
  const name = (location.hash.replace(/^#\//, "") || "overview").split("?")[0];
  const render = views[name] || views.overview;
  document.querySelectorAll("#nav a").forEach(a => a.classList.toggle("active", a.getAttribute("href") === "#/" + name));
  const view = document.getElementById("view");
  document.getElementById("login").hidden = true;
  document.getElementById("logout").hidden = false;
  view.hidden = false;
  view.replaceChildren();
  view.dataset.view = name;
  view.dataset.ready = "";
  await guarded(() => render(view));
  view.dataset.ready = "true";
}

document.getElementById("login-form").addEventListener("submit", async event => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  notify("", "");
  await route();
});
document.getElementById("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin("");
});
window.addEventListener("hashchange", route);
api("/api/health").then(h => { document.getElementById("server-name").textContent = h.server; }).catch(() => {});
route();
