// Spillway chat widget: one tag adds a chat bubble to any page.
//
//   <script src="https://gateway.example/widget.js" data-key="pk_..." async></script>
//
// Attributes (all optional but data-key): data-title, data-greeting,
// data-color, data-position ("right" | "left"), data-model, data-open
// ("true": start open), data-transport ("auto" | "ws" | "sse"),
// data-mode ("bubble" | "embed": fill the page, used by /embed).
// CSS custom properties on `spillway-chat` theme it further (docs/widget.md).
//
// Everything lives in a shadow root: the host page's CSS cannot reach in,
// and nothing here leaks out. Model output is untrusted: it is rendered by
// a small Markdown subset that only ever creates elements and text nodes,
// never HTML.
(() => {
  "use strict";
  const script = document.currentScript;
  if (!script || !script.src) return;
  const data = script.dataset;
  const base = new URL(".", script.src).href.replace(/\/$/, "");
  const mode = data.mode === "embed" ? "embed" : "bubble";
  const key = data.key || new URLSearchParams(location.search).get("key") || "";
  const options = {
    title: data.title || "Chat",
    greeting: data.greeting || "",
    color: data.color || "",
    position: data.position === "left" ? "left" : "right",
    model: data.model || undefined,
    transport: data.transport || "auto",
    open: mode === "embed" || data.open === "true",
  };
  const slot = (name) => `spillway.${name}.${key}`;

  // ---- styles -------------------------------------------------------------

  const CSS = `
:host { all: initial !important; }
.root { --c: var(--spillway-color, #3b5bdb); --bg: var(--spillway-background, #fff); --fg: var(--spillway-text, #1d2330);
  --muted: var(--spillway-muted, #6b7280); --line: var(--spillway-border, #e2e5ea); --radius: var(--spillway-radius, 14px);
  font: 15px/1.45 var(--spillway-font, system-ui, -apple-system, "Segoe UI", Roboto, sans-serif); color: var(--fg);
  letter-spacing: normal; text-align: left; text-transform: none; box-sizing: border-box; }
.root *, .root *::before, .root *::after { box-sizing: inherit; font: inherit; color: inherit; letter-spacing: inherit; }
.launcher { position: fixed; bottom: 20px; right: 20px; z-index: 2147483000; width: 56px; height: 56px; border-radius: 50%;
  border: 0; background: var(--c); color: #fff; cursor: pointer; box-shadow: 0 4px 16px rgba(0,0,0,.2); display: grid; place-items: center; padding: 0; margin: 0; }
.left .launcher { right: auto; left: 20px; }
.launcher svg { width: 26px; height: 26px; fill: #fff; }
.launcher:focus-visible, button:focus-visible, textarea:focus-visible { outline: 3px solid color-mix(in srgb, var(--c) 45%, transparent); outline-offset: 2px; }
.badge { position: absolute; top: -4px; right: -4px; min-width: 20px; height: 20px; padding: 0 6px; border-radius: 10px;
  background: #e03131; color: #fff; font-size: 12px; line-height: 20px; text-align: center; font-weight: 600; }
.panel { position: fixed; bottom: 88px; right: 20px; z-index: 2147483000; width: 380px; max-width: calc(100vw - 40px);
  height: 560px; max-height: calc(100vh - 110px); background: var(--bg); border: 1px solid var(--line); border-radius: var(--radius);
  box-shadow: 0 12px 40px rgba(0,0,0,.18); display: flex; flex-direction: column; overflow: hidden; margin: 0; padding: 0; }
.left .panel { right: auto; left: 20px; }
.embed .panel { position: static; width: 100%; height: 100%; max-width: none; max-height: none; border: 0; border-radius: 0; box-shadow: none; }
.embed { position: fixed; inset: 0; }
[hidden] { display: none !important; }
header { display: flex; align-items: center; gap: 8px; padding: 12px 14px; background: var(--c); color: #fff; }
header h2 { margin: 0; font-size: 16px; font-weight: 600; flex: 1; }
.presence { font-size: 12px; opacity: .9; }
.presence::before { content: ""; display: inline-block; width: 8px; height: 8px; border-radius: 50%; background: #8ce99a; margin-right: 5px; vertical-align: 1px; }
.close { background: transparent; border: 0; color: #fff; font-size: 22px; line-height: 1; cursor: pointer; padding: 2px 6px; border-radius: 6px; }
.log { flex: 1; overflow-y: auto; padding: 14px; display: flex; flex-direction: column; gap: 10px; overscroll-behavior: contain; }
.msg { max-width: 85%; padding: 8px 12px; border-radius: 12px; white-space: normal; overflow-wrap: anywhere; }
.msg.user { align-self: flex-end; background: var(--c); color: #fff; white-space: pre-wrap; }
.msg.assistant, .msg.greeting { align-self: flex-start; background: color-mix(in srgb, var(--fg) 6%, var(--bg)); }
.msg p { margin: 0 0 .5em; } .msg p:last-child { margin-bottom: 0; }
.msg ul, .msg ol { margin: .25em 0 .5em; padding-left: 1.3em; }
.msg pre { margin: .4em 0; padding: 8px 10px; background: #111827; color: #e5e7eb; border-radius: 8px; overflow-x: auto; white-space: pre; }
.msg code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
.msg :not(pre) > code { background: color-mix(in srgb, var(--fg) 10%, transparent); padding: 1px 4px; border-radius: 4px; }
.msg a { color: var(--c); text-decoration: underline; }
.msg.failed, .msg.error { border: 1px solid #ffa8a8; }
.note { display: block; margin-top: 6px; font-size: 12px; color: #c92a2a; }
.note button { margin-left: 6px; font-size: 12px; background: none; border: 1px solid currentColor; color: inherit; border-radius: 6px; padding: 1px 8px; cursor: pointer; }
.caret { display: inline-block; width: .5em; height: 1em; margin-left: 1px; vertical-align: -2px; background: currentColor; animation: blink 1s steps(1) infinite; }
@keyframes blink { 50% { opacity: 0; } }
@media (prefers-reduced-motion: reduce) { .caret { animation: none; } }
.typing, .status { padding: 0 14px 6px; font-size: 12px; color: var(--muted); min-height: 0; }
form { display: flex; gap: 8px; padding: 10px; border-top: 1px solid var(--line); margin: 0; }
textarea { flex: 1; resize: none; border: 1px solid var(--line); border-radius: 10px; padding: 8px 10px; min-height: 40px; max-height: 120px;
  background: var(--bg); color: var(--fg); margin: 0; }
.send, .stop { border: 0; border-radius: 10px; padding: 0 14px; background: var(--c); color: #fff; cursor: pointer; font-weight: 600; margin: 0; }
.stop { background: #495057; }
.send:disabled { opacity: .5; cursor: default; }
.sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
@media (max-width: 480px) {
  .bubble .panel { inset: 0; width: 100%; height: 100%; max-width: none; max-height: none; border-radius: 0; border: 0; }
  .bubble.open .launcher { display: none; }
}`;

  // ---- safe Markdown subset ------------------------------------------------
  // Blocks: paragraphs, fenced code, lists, headings (as bold paragraphs).
  // Inline: `code`, **bold**, *italic*/_italic_, [links](https://...), bare URLs.
  // Only createElement/createTextNode: text can never become markup.

  const h = (tag, attrs, ...children) => {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === false || v == null) continue;
      if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c != null) el.append(c);
    return el;
  };

  const INLINE = /(`+)([^`]+?)\1|\*\*(.+?)\*\*|__(.+?)__|\[([^\]\n]+)\]\(([^)\s]+)\)|(?<![\w*])\*(?!\s)([^*\n]+?)\*(?!\w)|(?<!\w)_(?!\s)([^_\n]+?)_(?!\w)|\bhttps?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/g;

  function safeHref(url) {
    try {
      const u = new URL(url, location.href);
      return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
    } catch {
      return null;
    }
  }

  function link(text, url) {
    const href = safeHref(url);
    if (!href) return document.createTextNode(text);
    return h("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" }, ...inline(text));
  }

  function inline(text) {
    const out = [];
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
      if (m[2] !== undefined) out.push(h("code", { text: m[2] }));
      else if (m[3] !== undefined || m[4] !== undefined) out.push(h("strong", null, ...inline(m[3] ?? m[4])));
      else if (m[5] !== undefined) out.push(safeHref(m[6]) ? link(m[5], m[6]) : document.createTextNode(m[0]));
      else if (m[7] !== undefined || m[8] !== undefined) out.push(h("em", null, ...inline(m[7] ?? m[8])));
      else out.push(link(m[0], m[0]));
      last = m.index + m[0].length;
    }
    if (last < text.length) out.push(document.createTextNode(text.slice(last)));
    return out;
  }

  function withBreaks(lines) {
    const out = [];
    lines.forEach((line, i) => {
      if (i) out.push(h("br"));
      out.push(...inline(line));
    });
    return out;
  }

  function markdown(text) {
    const frag = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = [];
    let list = null;
    const flushPara = () => { if (para.length) frag.append(h("p", null, ...withBreaks(para))); para = []; };
    const flushList = () => { if (list) frag.append(list.el); list = null; };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = /^\s*(```|~~~)\s*([\w+-]*)\s*$/.exec(line);
      if (fence) {
        flushPara(); flushList();
        const body = [];
        for (i++; i < lines.length && !new RegExp("^\\s*" + fence[1] + "\\s*$").test(lines[i]); i++) body.push(lines[i]);
        const code = h("code", { text: body.join("\n") });
        if (fence[2]) code.setAttribute("data-lang", fence[2]);
        frag.append(h("pre", null, code));
        continue;
      }
      const item = /^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/.exec(line);
      if (item) {
        flushPara();
        const tag = item[1] ? "ul" : "ol";
        if (!list || list.tag !== tag) {
          flushList();
          list = { tag, el: h(tag, tag === "ol" && item[2] !== "1" ? { start: item[2] } : null) };
        }
        list.el.append(h("li", null, ...inline(item[3])));
        continue;
      }
      if (!line.trim()) { flushPara(); flushList(); continue; }
      const heading = /^#{1,6}\s+(.*)$/.exec(line);
      if (heading) { flushPara(); flushList(); frag.append(h("p", null, h("strong", null, ...inline(heading[1])))); continue; }
      flushList();
      para.push(line);
    }
    flushPara(); flushList();
    return frag;
  }

  // ---- the DOM --------------------------------------------------------------

  const host = document.createElement("spillway-chat");
  if (options.color) host.style.setProperty("--spillway-color", options.color);
  const shadow = host.attachShadow({ mode: "open" });
  const icon = () => {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z");
    svg.append(path);
    return svg;
  };
  const badge = h("span", { class: "badge", hidden: true, "aria-hidden": "true" });
  const launcher = h("button", { class: "launcher", type: "button", "aria-label": `Open chat: ${options.title}`, "aria-expanded": "false", "aria-controls": "spillway-panel" }, icon(), badge);
  const presence = h("span", { class: "presence", hidden: true });
  const closeButton = h("button", { class: "close", type: "button", "aria-label": "Close chat" }, "\u00d7");
  const log = h("div", { class: "log", role: "log", "aria-live": "polite", "aria-relevant": "additions text", "aria-label": "Conversation" });
  const typingLine = h("div", { class: "typing", hidden: true, "aria-live": "polite" });
  const statusLine = h("div", { class: "status", role: "status", hidden: true });
  const input = h("textarea", { rows: "1", placeholder: "Type a message\u2026", "aria-label": "Message", maxlength: "8000" });
  const sendButton = h("button", { class: "send", type: "submit" }, "Send");
  const stopButton = h("button", { class: "stop", type: "button", hidden: true, "aria-label": "Stop the answer" }, "Stop");
  const form = h("form", null, input, stopButton, sendButton);
  const panel = h("section", { class: "panel", id: "spillway-panel", role: mode === "embed" ? "region" : "dialog", "aria-label": options.title, hidden: !options.open },
    h("header", null, h("h2", { text: options.title }), presence, mode === "embed" ? null : closeButton),
    log, typingLine, statusLine, form);
  const root = h("div", { class: `root ${mode} ${options.position}${options.open ? " open" : ""}` }, mode === "embed" ? null : launcher, panel);
  const style = document.createElement("style");
  style.textContent = CSS;
  shadow.append(style, root);
  const mount = () => document.body.append(host);
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  // ---- state ------------------------------------------------------------------

  /** Bubbles by key: "m:<message id>", "c:<client_message_id>", "g:<generation id>". */
  const bubbles = new Map();
  let client = null;
  let conversationId = null;
  let unread = 0;
  let lastUserText = "";
  const streaming = new Set();
  const typers = new Map();
  /** Who is in the conversation (presence), the visitor included. */
  const members = new Set();
  const bridge = mode === "embed" ? embedBridge() : null;

  function isOpen() { return !panel.hidden; }

  function setOpen(open) {
    panel.hidden = !open;
    root.classList.toggle("open", open);
    launcher.setAttribute("aria-expanded", String(open));
    if (open) {
      unread = 0;
      renderBadge();
      input.focus();
      scrollDown(true);
    } else if (mode !== "embed") {
      launcher.focus();
    }
    if (bridge) bridge.post(open ? "spillway:open" : "spillway:close", {});
  }

  function renderBadge() {
    badge.hidden = unread === 0;
    badge.textContent = unread > 9 ? "9+" : String(unread);
    launcher.setAttribute("aria-label", `Open chat: ${options.title}` + (unread ? ` (${unread} unread)` : ""));
  }

  function noteUnread() {
    if (isOpen()) return;
    unread += 1;
    renderBadge();
  }

  function scrollDown(force) {
    const near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    if (force || near) log.scrollTop = log.scrollHeight;
  }

  function setStatus(text) {
    statusLine.hidden = !text;
    statusLine.textContent = text || "";
  }

  function bubble(key, role) {
    let b = bubbles.get(key);
    if (!b) {
      const el = h("div", { class: `msg ${role}`, "data-key": key });
      b = { el, role, text: "", queued: false };
      bubbles.set(key, b);
      log.append(el);
    }
    return b;
  }

  /** Re-renders an assistant bubble from its whole text (at most once a frame). */
  function paint(b) {
    if (b.queued) return;
    b.queued = true;
    requestAnimationFrame(() => {
      b.queued = false;
      const body = markdown(b.text);
      if (b.streaming) {
        const caret = h("span", { class: "caret", "aria-hidden": "true" });
        const lastBlock = body.lastElementChild;
        if (lastBlock && lastBlock.tagName !== "PRE" && lastBlock.tagName !== "UL" && lastBlock.tagName !== "OL") lastBlock.append(caret);
        else body.append(caret);
      }
      b.el.replaceChildren(body);
      if (b.note) b.el.append(b.note);
      b.el.setAttribute("aria-busy", b.streaming ? "true" : "false");
      scrollDown(false);
    });
  }

  function showUser(key, text, extra) {
    const b = bubble(key, "user");
    b.text = text;
    b.el.textContent = text;
    if (extra) b.el.dataset.clientMessageId = extra;
    scrollDown(true);
    return b;
  }

  function showReply(generationId, text, streamingNow) {
    const b = bubble("g:" + generationId, "assistant");
    b.text = text;
    b.streaming = streamingNow;
    if (streamingNow) streaming.add(generationId);
    else streaming.delete(generationId);
    stopButton.hidden = streaming.size === 0;
    paint(b);
    return b;
  }

  function failNote(b, message, retry) {
    b.note = h("span", { class: "note", role: "alert" }, message, retry ? h("button", { type: "button", onclick: retry }, "Retry") : null);
    b.el.classList.add("error");
    if (b.role === "user") b.el.append(b.note);
    else paint(b);
  }

  function retryLast() {
    if (lastUserText) submit(lastUserText);
  }

  // ---- talking to the gateway -------------------------------------------------

  async function start(sdk) {
    client = new sdk.SpillwayClient({
      url: base,
      getToken: sdk.widgetTokens(base, key),
      transport: options.transport,
      model: options.model,
      storageKey: slot("replies"),
    });
    host.spillway = client;
    client.onStatus(({ status }) => {
      if (status === "reconnecting") setStatus("Reconnecting\u2026");
      else if (status === "open") setStatus("");
    });
    client.on("ack", ({ clientMessageId, messageId }) => {
      const b = bubbles.get("c:" + clientMessageId);
      if (b) { bubbles.delete("c:" + clientMessageId); bubbles.set("m:" + messageId, b); b.el.dataset.key = "m:" + messageId; }
    });
    client.on("reply", ({ generationId, conversationId: c }) => {
      if (c !== conversationId) return;
      const b = bubbles.get("g:" + generationId);
      showReply(generationId, b ? b.text : "", true);
    });
    client.onDelta(({ generationId, conversationId: c, text }) => {
      if (c && c !== conversationId) return;
      showReply(generationId, text, true);
    });
    client.on("restart", ({ generationId }) => showReply(generationId, "", true));
    client.onDone(({ generationId, conversationId: c, text }) => {
      if (c && c !== conversationId) return;
      showReply(generationId, text, false);
      noteUnread();
      if (bridge) bridge.post("spillway:reply", { generationId, text });
    });
    client.onError((err) => {
      if (err.generationId) {
        if (!bubbles.has("g:" + err.generationId) && err.conversationId !== conversationId) return;
        const b = showReply(err.generationId, err.text || "", false);
        const stopped = err.code === "cancelled";
        failNote(b, stopped ? "Stopped." : `The answer failed (${err.code}).`, stopped ? null : retryLast);
      } else if (err.clientMessageId) {
        const b = bubbles.get("c:" + err.clientMessageId);
        if (b && !err.retryable) failNote(b, `Not sent (${err.code}).`, () => { b.el.remove(); bubbles.delete("c:" + err.clientMessageId); submit(b.text); });
      } else if (err.code === "slow_consumer") {
        setStatus("Reconnecting\u2026");
      } else {
        setStatus(`Chat unavailable (${err.code}).`);
      }
      if (bridge) bridge.post("spillway:error", { code: err.code, retryable: err.retryable });
    });
    client.onMessage(({ conversationId: c, message }) => {
      if (c !== conversationId || message.role !== "user" || bubbles.has("m:" + message.id)) return;
      showUser("m:" + message.id, message.content);
      noteUnread();
    });
    client.onPresence(({ conversationId: c, event, users, devices }) => {
      if (c !== conversationId) return;
      if (event === "snapshot") members.clear();
      for (const u of users) {
        if (event === "leave") members.delete(u);
        else members.add(u);
      }
      const others = [...members].filter((u) => u !== client.userId);
      presence.hidden = others.length === 0 && devices <= 1;
      presence.textContent = others.length ? `${others.join(", ")} online` : devices > 1 ? `${devices} devices` : "";
      presence.dataset.devices = String(devices);
    });
    client.onTyping(({ conversationId: c, userId, typing }) => {
      if (c !== conversationId || userId === client.userId) return;
      clearTimeout(typers.get(userId));
      if (typing) typers.set(userId, setTimeout(() => { typers.delete(userId); renderTyping(); }, 6000));
      else typers.delete(userId);
      renderTyping();
    });
    client.on("reload", ({ generationId }) => {
      // The reply cannot be resumed exactly: the history has it as stored.
      streaming.delete(generationId);
      stopButton.hidden = streaming.size === 0;
      loadHistory();
    });
    client.on("resync", () => loadHistory());

    // In-flight replies restored from before a reload show at once.
    for (const r of client.inFlight()) {
      if (!conversationId || r.conversationId === conversationId) showReply(r.generationId, r.text, true);
    }
    client.connect();
    try {
      conversationId = await openConversation();
      client.subscribe(conversationId);
      await loadHistory();
      input.disabled = false;
      if (bridge) bridge.post("spillway:ready", { conversationId });
    } catch (err) {
      setStatus(`Chat unavailable (${(err && err.code) || "error"}).`);
      if (bridge) bridge.post("spillway:error", { code: (err && err.code) || "error" });
    }
  }

  async function openConversation() {
    let id = null;
    try { id = localStorage.getItem(slot("conversation")); } catch { /* storage denied */ }
    if (id) {
      try {
        await client.getConversation(id);
        return id;
      } catch (err) {
        if (err.status !== 404) throw err;
      }
    }
    const created = await client.createConversation({ title: options.title, metadata: { source: "widget" } });
    try { localStorage.setItem(slot("conversation"), created.id); } catch { /* storage denied */ }
    return created.id;
  }

  /** Lays out the conversation from the history API, keeping live replies. */
  async function loadHistory() {
    const messages = await client.history(conversationId);
    const live = new Map([...streaming].map((g) => [g, bubbles.get("g:" + g)]));
    for (const [key, b] of bubbles) if (!key.startsWith("c:")) b.el.remove();
    for (const key of [...bubbles.keys()]) if (!key.startsWith("c:")) bubbles.delete(key);
    const greeting = log.querySelector(".greeting");
    if (greeting) greeting.remove();
    if (options.greeting) log.prepend(h("div", { class: "msg greeting" }, ...inline(options.greeting)));
    for (const m of messages) {
      if (m.role === "user") {
        const pending = m.client_message_id && bubbles.get("c:" + m.client_message_id);
        if (pending) { pending.el.remove(); bubbles.delete("c:" + m.client_message_id); }
        showUser("m:" + m.id, m.content);
        lastUserText = m.content;
      } else if (m.role === "assistant" && m.generation_id) {
        if (live.has(m.generation_id)) continue; // still streaming here: the stream wins
        const b = showReply(m.generation_id, m.content, false);
        if (m.status === "failed") failNote(b, "The answer failed.", retryLast);
        else if (m.status === "aborted") failNote(b, "Stopped.", null);
      }
    }
    for (const [g, b] of live) {
      if (!b) continue;
      log.append(b.el);
      bubbles.set("g:" + g, b);
    }
    for (const [key, b] of bubbles) if (key.startsWith("c:")) log.append(b.el);
    scrollDown(true);
  }

  function renderTyping() {
    const names = [...typers.keys()];
    typingLine.hidden = names.length === 0;
    typingLine.textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing\u2026` : "";
  }

  function submit(text) {
    const content = text.trim();
    if (!content || !client || !conversationId) return false;
    lastUserText = content;
    const clientMessageId = client.send(conversationId, content);
    showUser("c:" + clientMessageId, content, clientMessageId);
    if (bridge) bridge.post("spillway:message", { text: content });
    return true;
  }

  // ---- input -----------------------------------------------------------------------

  let typingSent = 0;
  launcher.addEventListener("click", () => setOpen(!isOpen()));
  closeButton.addEventListener("click", () => setOpen(false));
  root.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && isOpen() && mode !== "embed") { e.stopPropagation(); setOpen(false); }
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (submit(input.value)) {
      input.value = "";
      if (typingSent) { client.typing(conversationId, false); typingSent = 0; }
    }
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
  input.addEventListener("input", () => {
    if (!client || !conversationId) return;
    const now = Date.now();
    if (now - typingSent > 3000) { client.typing(conversationId, true); typingSent = now; }
  });
  stopButton.addEventListener("click", () => {
    for (const g of streaming) client.cancel(g);
  });
  window.addEventListener("online", () => client && client.reconnectNow());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && client && client.status !== "open") client.reconnectNow();
  });
  input.disabled = true;
  if (options.greeting) log.append(h("div", { class: "msg greeting" }, ...inline(options.greeting)));

  // ---- the iframe's postMessage API (docs/widget.md) -------------------------

  function embedBridge() {
    // Only the page that frames us (allowed by the CSP's frame-ancestors)
    // may drive it, and only it hears our events.
    const parentOrigin = (location.ancestorOrigins && location.ancestorOrigins[0])
      || (document.referrer ? new URL(document.referrer).origin : null);
    const framed = window.parent !== window && parentOrigin && parentOrigin !== "null";
    window.addEventListener("message", (e) => {
      if (!framed || e.source !== window.parent || e.origin !== parentOrigin) return;
      const msg = e.data;
      if (!msg || typeof msg !== "object" || typeof msg.type !== "string") return;
      switch (msg.type) {
        case "spillway:open": setOpen(true); break;
        case "spillway:close": setOpen(false); break;
        case "spillway:send": if (typeof msg.text === "string") submit(msg.text); break;
        case "spillway:theme":
          if (typeof msg.color === "string") host.style.setProperty("--spillway-color", msg.color);
          if (typeof msg.title === "string") panel.querySelector("h2").textContent = msg.title;
          break;
        default: break;
      }
    });
    return { post(type, payload) { if (framed) window.parent.postMessage({ type, ...payload }, parentOrigin); } };
  }

  if (!key) {
    setStatus("No widget key (data-key).");
    return;
  }
  import(new URL("sdk/spillway.js", script.src).href).then(start, () => setStatus("Chat unavailable (could not load)."));
})();
