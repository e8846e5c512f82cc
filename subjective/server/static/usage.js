// The usage page: reads /v1/usage with the pasted key and draws it. No library, no build step.
// The key lives in sessionStorage (this tab only) and in the Authorization header, nowhere else.
"use strict";

const KEY_ITEM = "subjective-api-key";
const MAX_ROWS = 1000; // the server's limit per request
const DAY_MS = 86400000;
const SVG = "http://www.w3.org/2000/svg";

const $ = (selector) => document.querySelector(selector);

function groupInt(n) {
  return Math.round(n).toLocaleString("en-US");
}

// FLOPs with an SI prefix and 4 significant digits.
function formatFlops(n) {
  const units = [[1e18, "E"], [1e15, "P"], [1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "k"]];
  for (const [scale, prefix] of units) {
    if (n >= scale) return `${(n / scale).toPrecision(4)} ${prefix}FLOP`;
  }
  return `${n} FLOP`;
}

// Integer nano-units of the currency as an exact decimal with 9 places.
function formatNanos(nanos) {
  const text = BigInt(nanos).toString().padStart(10, "0");
  return `${text.slice(0, -9)}.${text.slice(-9)}`;
}

function savedRatio(flops, dense) {
  return dense > 0 ? 1 - flops / dense : null;
}

function formatRatio(ratio) {
  return ratio === null ? "–" : `${(100 * ratio).toFixed(1)} %`;
}

function emptyTotals() {
  return { requests: 0, prompt_tokens: 0, completion_tokens: 0, flops: 0, dense_flops: 0, price_nanos: 0 };
}

function add(totals, row) {
  totals.requests += 1;
  for (const field of ["prompt_tokens", "completion_tokens", "flops", "dense_flops", "price_nanos"]) {
    totals[field] += row[field];
  }
}

function utcDay(time) {
  return new Date(time).toISOString().slice(0, 10);
}

// Every UTC day of the period, oldest first, each with its records' sums.
function perDay(rows, firstDay, days) {
  const byDay = new Map();
  for (let i = 0; i < days; i += 1) byDay.set(utcDay(firstDay + i * DAY_MS), emptyTotals());
  for (const row of rows) {
    const totals = byDay.get(row.finished_at.slice(0, 10));
    if (totals) add(totals, row);
  }
  return [...byDay.entries()];
}

function perKey(rows) {
  const byKey = new Map();
  for (const row of rows) {
    if (!byKey.has(row.api_key_id)) byKey.set(row.api_key_id, emptyTotals());
    add(byKey.get(row.api_key_id), row);
  }
  return [...byKey.entries()].sort((a, b) => b[1].price_nanos - a[1].price_nanos || b[1].flops - a[1].flops);
}

function cell(row, text, field, value) {
  const td = row.insertCell();
  td.textContent = text;
  if (field) {
    td.dataset.field = field;
    td.dataset.value = String(value);
  }
}

function fillRow(row, totals) {
  const ratio = savedRatio(totals.flops, totals.dense_flops);
  cell(row, groupInt(totals.requests), "requests", totals.requests);
  cell(row, groupInt(totals.prompt_tokens), "prompt_tokens", totals.prompt_tokens);
  cell(row, groupInt(totals.completion_tokens), "completion_tokens", totals.completion_tokens);
  cell(row, formatFlops(totals.flops), "flops", totals.flops);
  cell(row, formatFlops(totals.dense_flops), "dense_flops", totals.dense_flops);
  cell(row, formatRatio(ratio), "saved_ratio", ratio === null ? "" : ratio);
  cell(row, formatNanos(totals.price_nanos), "price", formatNanos(totals.price_nanos));
}

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// Grouped bars, one group per day, one bar per series; hover a bar for its value.
function barChart(title, days, series, format) {
  const width = 560, height = 180, left = 80, bottom = 22, top = 8;
  const plotWidth = width - left - 8, plotHeight = height - top - bottom;
  const max = Math.max(0, ...series.flatMap((s) => s.values));
  const figure = document.createElement("figure");
  figure.className = "chart";
  const heading = document.createElement("h3");
  heading.textContent = title;
  figure.append(heading);
  const svg = svgElement("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  svg.append(svgElement("line", { class: "axis", x1: left, y1: top + plotHeight, x2: width - 8, y2: top + plotHeight }));
  svg.append(svgElement("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, format(max)));
  svg.append(svgElement("text", { x: left - 4, y: top + plotHeight, "text-anchor": "end" }, format(0)));
  const slot = plotWidth / days.length;
  const barWidth = Math.max(1, (slot * 0.8) / series.length);
  days.forEach((day, i) => {
    series.forEach((s, j) => {
      const value = s.values[i];
      const barHeight = max > 0 ? (plotHeight * Math.max(0, value)) / max : 0;
      const bar = svgElement("rect", {
        class: s.key,
        x: left + i * slot + slot * 0.1 + j * barWidth,
        y: top + plotHeight - barHeight,
        width: barWidth,
        height: barHeight,
      });
      bar.append(svgElement("title", {}, `${day} ${s.name}: ${format(value)}`));
      svg.append(bar);
    });
    if (i === 0 || i === days.length - 1 || days.length <= 10) {
      svg.append(svgElement("text", { x: left + i * slot + slot / 2, y: height - 6, "text-anchor": "middle" }, day.slice(5)));
    }
  });
  figure.append(svg);
  const legend = document.createElement("figcaption");
  legend.className = "legend";
  for (const s of series) {
    const swatch = document.createElement("span");
    swatch.className = `swatch s-${s.key}`;
    legend.append(swatch, s.name);
  }
  figure.append(legend);
  return figure;
}

function drawCharts(days) {
  const labels = days.map(([day]) => day);
  const values = (pick) => days.map(([, totals]) => pick(totals));
  const charts = $("#charts");
  charts.replaceChildren(
    barChart("Requests per day", labels, [{ key: "requests", name: "requests", values: values((t) => t.requests) }], groupInt),
    barChart("Tokens per day", labels, [
      { key: "prompt", name: "prompt", values: values((t) => t.prompt_tokens) },
      { key: "completion", name: "completion", values: values((t) => t.completion_tokens) },
    ], groupInt),
    barChart("FLOPs per day: executed vs dense-equivalent", labels, [
      { key: "executed", name: "executed", values: values((t) => t.flops) },
      { key: "dense", name: "dense-equivalent", values: values((t) => t.dense_flops) },
    ], formatFlops),
    barChart("Saved vs dense per day", labels, [
      { key: "saved", name: "saved ratio", values: values((t) => savedRatio(t.flops, t.dense_flops) ?? 0) },
    ], (r) => `${(100 * r).toFixed(1)} %`),
    barChart("Spend per day", labels, [
      { key: "spend", name: "spend", values: values((t) => t.price_nanos / 1e9) },
    ], (v) => v.toPrecision(3)),
  );
}

function showMessage(text) {
  const message = $("#message");
  message.textContent = text;
  message.hidden = !text;
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return response.statusText;
  }
}

async function fetchUsage(key, since) {
  const url = `/v1/usage?since=${encodeURIComponent(since)}&limit=${MAX_ROWS}`;
  return fetch(url, { headers: { authorization: `Bearer ${key}` }, cache: "no-store" });
}

// Admin keys may read the admin routes; a 403 says the key is a plain one.
async function isAdmin(key) {
  const response = await fetch("/admin/v1/threshold", { headers: { authorization: `Bearer ${key}` } });
  return response.ok;
}

async function show(key) {
  const days = Number($("#days").value);
  const firstDay = Date.parse(utcDay(Date.now())) - (days - 1) * DAY_MS;
  const since = new Date(firstDay).toISOString();
  showMessage("");
  let response;
  try {
    response = await fetchUsage(key, since);
  } catch {
    showMessage("The server could not be reached. Check your connection and try again.");
    return;
  }
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    $("#report").hidden = true;
    showMessage(`This key was not accepted (401): ${await errorText(response)} Paste the whole key, as \`subjective keys create\` printed it (it starts with sk-subj-).`);
    return;
  }
  if (!response.ok) {
    $("#report").hidden = true;
    showMessage(`The server could not show usage (${response.status}): ${await errorText(response)}`);
    return;
  }
  const usage = await response.json();
  const admin = await isAdmin(key);
  render(usage, admin, firstDay, days);
}

function render(usage, admin, firstDay, days) {
  const totals = usage.totals;
  $("#scope").textContent = admin
    ? `Admin key: every key's usage over the last ${days} days (UTC).`
    : `Your key's usage over the last ${days} days (UTC).`;
  const ratio = savedRatio(totals.flops, totals.dense_flops);
  for (const element of document.querySelectorAll("[data-total]")) {
    const field = element.dataset.total;
    let text, value;
    if (field === "saved_ratio") [text, value] = [formatRatio(ratio), ratio ?? ""];
    else if (field === "price") text = value = formatNanos(totals.price_nanos);
    else if (field.endsWith("flops")) [text, value] = [formatFlops(totals[field]), totals[field]];
    else [text, value] = [groupInt(totals[field]), totals[field]];
    element.textContent = text;
    element.dataset.value = String(value);
  }
  $("#more").hidden = !usage.has_more;
  const daily = perDay(usage.data, firstDay, days);
  drawCharts(daily);
  const body = $("#days-table tbody");
  body.replaceChildren();
  for (const [day, dayTotals] of [...daily].reverse()) {
    if (dayTotals.requests === 0) continue;
    const row = body.insertRow();
    row.dataset.day = day;
    cell(row, day);
    fillRow(row, dayTotals);
  }
  $("#admin").hidden = !admin;
  const spenders = $("#spenders-table tbody");
  spenders.replaceChildren();
  if (admin) {
    for (const [keyId, keyTotals] of perKey(usage.data).slice(0, 10)) {
      const row = spenders.insertRow();
      row.dataset.key = keyId;
      cell(row, keyId);
      const ratio = savedRatio(keyTotals.flops, keyTotals.dense_flops);
      const tokens = keyTotals.prompt_tokens + keyTotals.completion_tokens;
      cell(row, groupInt(keyTotals.requests), "requests", keyTotals.requests);
      cell(row, groupInt(tokens), "tokens", tokens);
      cell(row, formatFlops(keyTotals.flops), "flops", keyTotals.flops);
      cell(row, formatRatio(ratio), "saved_ratio", ratio === null ? "" : ratio);
      cell(row, formatNanos(keyTotals.price_nanos), "price", formatNanos(keyTotals.price_nanos));
    }
  }
  $("#report").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  const stored = sessionStorage.getItem(KEY_ITEM);
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#key").value.trim();
    sessionStorage.setItem(KEY_ITEM, key);
    show(key);
  });
  $("#days").addEventListener("change", () => {
    const key = sessionStorage.getItem(KEY_ITEM);
    if (key) show(key);
  });
  $("#forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    $("#key").value = "";
    $("#report").hidden = true;
    showMessage("");
  });
  if (stored) {
    $("#key").value = stored;
    show(stored);
  }
});
