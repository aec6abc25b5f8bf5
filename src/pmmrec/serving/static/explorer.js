// The pmmrec explorer: vanilla JavaScript over the service's JSON routes (see pmmrec.serving.explorer_api).
// Every piece of text from the server is set with textContent, never parsed as HTML.
"use strict";

const state = { info: null, user: null, lastAdded: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function status(message, isError = false) {
  const box = $("status");
  box.textContent = message;
  box.classList.toggle("error", isError);
}

function detailText(body) {
  if (!body || body.detail === undefined) return "unexpected answer";
  if (typeof body.detail === "string") return body.detail;
  return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error(`${response.status}: ${detailText(body)}`);
  return body;
}

const enc = encodeURIComponent;

function options() {
  const input = $("k");
  let k = parseInt(input.value, 10);
  if (!Number.isFinite(k) || k < 1) k = 1;
  k = Math.min(k, parseInt(input.max, 10));
  input.value = k;
  return { k, exclude: $("exclude-history").checked };
}

// An item as a card: image (or a placeholder), title, id, and optional score/rank and badges.
function card(item, extra = {}) {
  const title = item.title || "(no title)";
  const figure = item.has_image
    ? el("img", { src: `/items/${enc(item.item_id)}/image`, alt: title, width: "112", height: "112",
                  decoding: "async" })
    : el("div", { class: "noimage", role: "img", "aria-label": `${title} (no image)`, text: "no image" });
  const badges = el("span", { class: "badges" });
  if (extra.hit) badges.append(el("span", { class: "badge hit-badge", text: "✓ held-out next item" }));
  if (item.added) badges.append(el("span", { class: "badge new-badge", text: "new item" }));
  const meta = [item.item_id];
  if (extra.score !== undefined) meta.push(`score ${extra.score.toFixed(3)}`);
  const classes = ["card", extra.hit ? "hit" : "", extra.next ? "next" : "", item.added ? "added" : ""];
  return el("li", { class: classes.filter(Boolean).join(" "), "data-item": item.item_id },
    extra.rank !== undefined ? el("span", { class: "rank", text: `#${extra.rank}` }) : null,
    figure,
    el("span", { class: "title", text: title }),
    el("span", { class: "meta", text: meta.join(" · ") }),
    badges.childElementCount ? badges : null);
}

function showServed(info) {
  const names = info.models.map((m) => `${m.name} (${m.modality}, ${m.fusion})`);
  const what = info.models.length > 1 ? `Comparing ${names.join(" with ")}` : `Model ${names[0]}`;
  $("served").textContent = `${what} · ${info.items} items · ${info.users} users`;
  const k = $("k");
  k.max = String(Math.min(info.max_k, 100));
  if (!info.can_add_items) {
    $("add-form").hidden = true;
    $("reach").replaceChildren(el("p", { class: "note", text: "This server does not take new items." }));
  }
  if (!info.users) status("The catalogue's domain has no users file: only adding items works here.");
}

async function searchUsers(query) {
  const list = $("user-results");
  try {
    const body = await getJSON(`/users?q=${enc(query)}&limit=12`);
    list.replaceChildren(...body.users.map((u) => el("li", {},
      el("button", { type: "button", class: "user", "data-user": u.user_id, onclick: () => explore(u.user_id) },
        `${u.user_id} `, el("span", { class: "muted", text: `(${u.length} items)` })))));
    status(body.total ? `${body.total} user(s) match` + (body.total > body.users.length
      ? `; showing the first ${body.users.length}` : "") : `No user id contains “${query}”.`);
  } catch (e) {
    status(`Search failed: ${e.message}`, true);
  }
}

async function randomUser() {
  const total = state.info ? state.info.users : 0;
  if (!total) { status("No users to pick from.", true); return; }
  try {
    const body = await getJSON(`/users?offset=${Math.floor(Math.random() * total)}&limit=1`);
    if (body.users.length) await explore(body.users[0].user_id);
  } catch (e) {
    status(`Could not pick a user: ${e.message}`, true);
  }
}

function renderColumn(column, k) {
  const section = el("section", { class: "column", "aria-label": `Top ${k} of ${column.name}`,
                                  "data-model": column.name });
  section.append(el("h4", { text: column.name }));
  if (column.error) {
    section.append(el("p", { class: "note error", text: column.error }));
    return section;
  }
  const summary = column.hit_rank ? `Hit: the held-out next item is at rank ${column.hit_rank}.`
    : "The held-out next item is not in this top K.";
  section.append(el("p", { class: column.hit_rank ? "summary hit-summary" : "summary", text: summary }));
  section.append(el("ol", { class: "cards grid" },
    ...column.items.map((x) => card(x, { score: x.score, rank: x.rank, hit: x.hit }))));
  return section;
}

async function explore(userId) {
  const { k, exclude } = options();
  status(`Loading user ${userId}…`);
  try {
    const body = await getJSON(`/users/${enc(userId)}?k=${k}&exclude_history=${exclude}`);
    state.user = userId;
    $("user-id").textContent = body.user_id;
    const shown = body.history.length;
    $("history-note").textContent = shown < body.history_length
      ? `(the last ${shown} of ${body.history_length}, oldest first)` : `(${shown} items, oldest first)`;
    $("history").replaceChildren(...body.history.map((x) => card(x)));
    $("next").replaceChildren(body.next ? el("ol", { class: "cards" }, card(body.next, { next: true }))
      : el("p", { class: "muted", text: "None: this user has a single interaction." }));
    $("columns").replaceChildren(...body.models.map((c) => renderColumn(c, k)));
    $("user-view").hidden = false;
    const hits = body.models.map((c) => `${c.name}: ${c.hit_rank ? "hit at rank " + c.hit_rank : "no hit"}`);
    status(`User ${body.user_id}: top ${k} shown (${hits.join("; ")}).`);
  } catch (e) {
    status(`Could not load user ${userId}: ${e.message}`, true);
  }
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function showReach(itemId) {
  const { k, exclude } = options();
  const box = $("reach");
  const body = await getJSON(`/items/${enc(itemId)}/reach?k=${k}&exclude_history=${exclude}`);
  const parts = [el("h3", { text: "Added" }), el("ol", { class: "cards" }, card(body.item))];
  for (const column of body.models) {
    const section = el("section", { class: "reach-column", "data-model": column.name },
      el("h4", { text: column.name }));
    if (!column.in_catalogue) {
      section.append(el("p", { class: "note", text: "This model cannot take new items." }));
    } else {
      section.append(el("p", { class: "summary",
        text: `In the top ${body.k} of ${column.users.length} of ${body.sampled} sampled users.` }));
      section.append(el("ul", { class: "user-list" }, ...column.users.map((u) => el("li", {},
        el("button", { type: "button", class: "user", "data-user": u.user_id, onclick: () => explore(u.user_id) },
          `${u.user_id} `, el("span", { class: "muted", text: `(rank ${u.rank})` }))))));
    }
    parts.push(section);
  }
  box.replaceChildren(...parts);
}

async function addItem(event) {
  event.preventDefault();
  const file = $("new-image").files[0];
  const title = $("new-title").value.trim();
  if (!file && !title) { status("Give an image, a title, or both.", true); return; }
  const itemId = $("new-id").value.trim() || `new-${Date.now().toString(36)}`;
  const button = $("add-button");
  button.disabled = true;
  status(`Adding ${itemId}…`);
  try {
    const image = file ? await readDataURL(file) : null;
    await getJSON("/items", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ items: [{ item_id: itemId, title: title || null, image }] }) });
    state.lastAdded = itemId;
    $("add-form").reset();
    await showReach(itemId);
    status(`Added ${itemId}; it is recommendable now.`);
    if (state.user) await explore(state.user);
  } catch (e) {
    status(`Could not add the item: ${e.message}`, true);
  } finally {
    button.disabled = false;
  }
}

async function start() {
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchUsers($("user-query").value); });
  $("random-user").addEventListener("click", randomUser);
  $("add-form").addEventListener("submit", addItem);
  const refresh = () => { if (state.user) explore(state.user); };
  $("k").addEventListener("change", refresh);
  $("exclude-history").addEventListener("change", refresh);
  try {
    state.info = await getJSON("/explorer");
    showServed(state.info);
    if (state.info.users) await searchUsers("");
  } catch (e) {
    status(`Cannot reach the service: ${e.message}`, true);
  }
  document.body.dataset.ready = "true";
}

document.addEventListener("DOMContentLoaded", start);
