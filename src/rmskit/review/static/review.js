// rmskit review page: selection, keyboard shortcuts, accept / reject / edit through the JSON API.
// No framework and no inline handlers (the CSP allows scripts from /static only). Text from the
// server is only ever written with textContent, never as HTML.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const cards = Array.from(document.querySelectorAll("article.card[data-id]"));
  const isDetail = document.body.classList.contains("detail-page");
  const dialog = document.getElementById("edit-dialog");
  const form = document.getElementById("edit-form");
  const toastEl = document.getElementById("toast");
  let selected = isDetail && cards.length ? 0 : -1;
  let editing = null;
  let toastTimer = null;

  function toast(msg, kind) {
    toastEl.textContent = msg;
    toastEl.className = "show " + (kind || "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { toastEl.className = ""; }, 2500);
  }

  function select(i, scroll) {
    if (!cards.length) return;
    i = Math.max(0, Math.min(cards.length - 1, i));
    if (selected >= 0 && cards[selected]) cards[selected].classList.remove("selected");
    selected = i;
    cards[i].classList.add("selected");
    if (scroll !== false) cards[i].scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  function current() {
    if (selected < 0) select(0);
    return cards[selected] || null;
  }

  function errorText(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail.map((e) => (e.loc ? e.loc.slice(1).join(".") + ": " : "") + e.msg).join("; ");
    }
    return "request failed (" + status + ")";
  }

  async function post(url, payload) {
    const resp = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(payload),
    });
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) throw new Error(errorText(body, resp.status));
    return body;
  }

  function apiUrl(card, what) {
    return "/api/samples/" + encodeURIComponent(card.dataset.id) + "/" + what;
  }

  function bumpCount(decision, delta) {
    const el = document.querySelector('[data-count="' + decision + '"]');
    if (el) el.textContent = String(Math.max(0, (parseInt(el.textContent, 10) || 0) + delta));
  }

  function updateCard(card, s) {
    const before = card.classList.contains("decision-accept") ? "accept" : card.classList.contains("decision-reject") ? "reject" : null;
    const after = s.decision || null;
    if (before !== after) {
      if (before) bumpCount(before, -1);
      if (after) bumpCount(after, +1);
    }
    card.classList.remove("decision-accept", "decision-reject", "decision-none");
    card.classList.add("decision-" + (s.decision || "none"));
    const state = card.querySelector('[data-role="state"]');
    if (state) state.textContent = s.decision === "accept" ? "accepted" : s.decision === "reject" ? "rejected" : "undecided";
    for (const f of ["query", "response", "category"]) {
      const el = card.querySelector('[data-field="' + f + '"]');
      if (el) el.textContent = s[f];
    }
    const edited = card.querySelector('[data-role="edited"]');
    if (edited) edited.classList.toggle("hidden", !(s.edited && s.edited.length));
  }

  function logHistory(text) {
    const list = document.querySelector('[data-role="history"]');
    if (!list) return;
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    const li = document.createElement("li");
    li.textContent = new Date().toLocaleString() + " — " + text;
    list.appendChild(li);
  }

  async function decide(card, decision) {
    if (!card) return;
    try {
      const body = await post(apiUrl(card, "decision"), { decision: decision });
      updateCard(card, body.sample);
      logHistory(decision);
      toast((decision === "accept" ? "accepted " : "rejected ") + card.dataset.id, decision);
      if (!isDetail && selected < cards.length - 1) select(selected + 1);
    } catch (err) {
      toast(err.message, "error");
    }
  }

  function fieldText(card, f) {
    const el = card.querySelector('[data-field="' + f + '"]');
    return el ? el.textContent : "";
  }

  function openEdit(card) {
    if (!card) return;
    editing = card;
    document.getElementById("edit-id").textContent = card.dataset.id;
    document.getElementById("edit-error").textContent = "";
    for (const f of ["query", "response", "category"]) form.elements[f].value = fieldText(card, f);
    dialog.showModal();
    form.elements.query.focus();
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!editing) return;
    const changes = {};
    for (const f of ["query", "response", "category"]) {
      const v = form.elements[f].value.trim();
      if (v !== fieldText(editing, f).trim()) changes[f] = v;
    }
    if (!Object.keys(changes).length) { dialog.close(); return; }
    try {
      const body = await post(apiUrl(editing, "edit"), changes);
      updateCard(editing, body.sample);
      logHistory("edit " + JSON.stringify(changes));
      toast("edited " + body.changed.join(", "), "edit");
      dialog.close();
    } catch (err) {
      document.getElementById("edit-error").textContent = err.message;
    }
  });
  document.getElementById("edit-cancel").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => { editing = null; });

  cards.forEach((card, i) => {
    card.addEventListener("click", (ev) => {
      const btn = ev.target.closest("button[data-action]");
      if (!ev.target.closest("a")) select(i, false);
      if (!btn) return;
      const action = btn.dataset.action;
      if (action === "edit") openEdit(card); else decide(card, action);
    });
  });

  function go(rel) {
    const link = document.querySelector('a[data-nav="' + rel + '"]');
    if (link) window.location.href = link.href;
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || dialog.open) return;
    const t = ev.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    switch (ev.key) {
      case "j":
        if (isDetail) go("next"); else select(selected + 1);
        break;
      case "k":
        if (isDetail) go("prev"); else select(selected < 0 ? 0 : selected - 1);
        break;
      case "a": decide(current(), "accept"); break;
      case "r": decide(current(), "reject"); break;
      case "e": openEdit(current()); break;
      case "Enter":
      case "o":
        if (!isDetail && selected >= 0) window.location.href = cards[selected].dataset.href;
        else return;
        break;
      case "/": {
        const s = document.getElementById("search");
        if (!s) return;
        s.focus();
        break;
      }
      default:
        return;
    }
    ev.preventDefault();
  });
})();
