// Spillway client SDK: the native protocol (docs/protocol.md) for browsers
// and React Native. One ES module, no dependencies.
//
// What it does for you:
// - connects over a WebSocket (`spillway.v1`), or streams over SSE-over-fetch
//   where a WebSocket cannot be held (automatic fallback);
// - reconnects with exponential backoff and full jitter, reading the close
//   codes (docs/protocol.md section 15);
// - resumes every reply in flight from its last `(epoch, next)`, kept in
//   `sessionStorage` so a page reload resumes too (section 8);
// - resends unacknowledged messages with their original client_message_id;
// - renews its credential through one hook (`getToken`).
//
// Replies are tracked by generation id; every handler receives the reply's
// whole text so far, so a UI re-renders from state and never has to
// de-duplicate a replayed frame itself.

const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 30_000;
/** A connection open this long resets the backoff. */
const STABLE_MS = 30_000;
/** After `heartbeat_ms` of silence we ping; no answer within this: dead. */
const PONG_TIMEOUT_MS = 10_000;
/** WebSocket attempts that fail before `hello` before `auto` falls back to SSE. */
const WS_FAILURES_BEFORE_SSE = 2;
/** Renew a token this long before it expires (or at 80 % of its life). */
const RENEW_MARGIN_MS = 60_000;
/** Replies remembered for resume (bounded; oldest forgotten first). */
const MAX_TRACKED = 32;

const EVENTS = [
  "status", "ack", "reply", "delta", "reasoning", "restart", "done", "error",
  "message", "presence", "typing", "reload", "resync", "token",
];

/** A random id (client_message_id, visitor-side ids). */
export function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return "c-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 12);
}

/** The reconnect delay for `attempt` (0-based): uniform in [0, min(cap, base*2^attempt)). */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** Math.min(attempt, 16));
  return random() * ceiling;
}

/** An error from the gateway: an HTTP error body, an `error` frame, or a close. */
export class SpillwayError extends Error {
  constructor(code, message, { retryable = false, status, generationId, clientMessageId } = {}) {
    super(message || code);
    this.name = "SpillwayError";
    this.code = code;
    this.retryable = retryable;
    this.status = status;
    this.generationId = generationId;
    this.clientMessageId = clientMessageId;
  }
}

function memoryStorage() {
  const map = new Map();
  return {
    getItem: (k) => (map.has(k) ? map.get(k) : null),
    setItem: (k, v) => map.set(k, String(v)),
    removeItem: (k) => map.delete(k),
  };
}

function defaultStorage() {
  try {
    if (globalThis.sessionStorage) return globalThis.sessionStorage;
  } catch {
    // Storage can be denied (third-party iframes, privacy modes).
  }
  return memoryStorage();
}

/**
 * Parses `text/event-stream` from a fetch body, calling `onEvent({event, data, id})`.
 * Handles CRLF/CR/LF line ends and events split across chunks.
 */
async function readEventStream(body, onEvent, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { event: "message", data: [], id: undefined };
  const dispatch = () => {
    if (event.data.length) onEvent({ event: event.event, data: event.data.join("\n"), id: event.id });
    event = { event: "message", data: [], id: undefined };
  };
  try {
    for (;;) {
      if (signal && signal.aborted) return;
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = /\r\n|\r|\n/.exec(buffer))) {
        // A trailing CR may be the first half of a CRLF: wait for more.
        if (match[0] === "\r" && match.index === buffer.length - 1) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") { dispatch(); continue; }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event.event = value;
        else if (field === "data") event.data.push(value);
        else if (field === "id" && !value.includes("\0")) event.id = value;
      }
    }
  } finally {
    try { reader.releaseLock(); } catch { /* already released */ }
  }
}

/**
 * A connection to a Spillway gateway for one user.
 *
 * Options:
 * - `url`: the gateway's base URL (`https://chat.example.com`);
 * - `getToken({ refresh })`: resolves to a token string, `{ token, expiresAt }`
 *   (expiresAt in Unix seconds), or null (development mode, see `user`);
 *   called at connect, when the server refuses the token (4401) with
 *   `refresh: true`, and before a token expires;
 * - `user`: the user name in development mode (no credentials);
 * - `transport`: `"auto"` (WebSocket, SSE-over-fetch when it cannot connect),
 *   `"ws"` or `"sse"`;
 * - `model`: the default model of `send`;
 * - `storage`: where reply state survives a reload (default `sessionStorage`);
 * - `storageKey`: its key (default `spillway.v1`);
 * - `WebSocket`, `fetch`: implementations to use (React Native, tests).
 */
export class SpillwayClient {
  constructor(options = {}) {
    if (!options.url) throw new TypeError("SpillwayClient: `url` is required");
    this.url = String(options.url).replace(/\/+$/, "");
    this.getToken = options.getToken || (async () => null);
    this.user = options.user || null;
    this.mode = options.transport || "auto";
    this.model = options.model || undefined;
    this.storage = options.storage || defaultStorage();
    this.storageKey = options.storageKey || "spillway.v1";
    this.WebSocketImpl = options.WebSocket || globalThis.WebSocket;
    this.fetchImpl = options.fetch || globalThis.fetch.bind(globalThis);

    /** Listeners by event name. */
    this.listeners = new Map(EVENTS.map((name) => [name, new Set()]));
    /** generation_id -> { conversationId, epoch, next, ended, text, reasoning, finishReason, usage }. */
    this.replies = new Map();
    /** Sends without their `ack`: [{ client_message_id, conversation_id, content, model }]. */
    this.pending = [];
    /** Conversations the app wants live (resubscribed after each reconnect). */
    this.subscriptions = new Set();
    /** The server session, to get subscriptions back on any instance. */
    this.sessionId = null;
    this.token = null;
    this.tokenExpiresAt = null;
    this.status = "idle";
    /** The user the gateway sees (from `hello`). */
    this.userId = null;
    this.transport = null; // "ws" | "sse" once connected
    this.socket = null;
    this.attempt = 0;
    this.wsFailures = 0;
    this.closed = true;
    this.timers = new Set();
    this.sseStreams = new Map(); // generation_id -> AbortController
    this.restore();
  }

  // ---- events -----------------------------------------------------------

  /** Adds a listener; returns a function that removes it. */
  on(name, handler) {
    const set = this.listeners.get(name);
    if (!set) throw new TypeError(`unknown event '${name}'`);
    set.add(handler);
    return () => set.delete(handler);
  }
  onDelta(h) { return this.on("delta", h); }
  onDone(h) { return this.on("done", h); }
  onError(h) { return this.on("error", h); }
  onPresence(h) { return this.on("presence", h); }
  onTyping(h) { return this.on("typing", h); }
  onMessage(h) { return this.on("message", h); }
  onStatus(h) { return this.on("status", h); }

  emit(name, payload) {
    for (const handler of this.listeners.get(name) || []) {
      try { handler(payload); } catch (err) { console.error("spillway listener failed", err); }
    }
  }

  setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.emit("status", { status, transport: this.transport });
  }

  // ---- persisted state (docs/protocol.md section 8, "Page reloads") -------------

  restore() {
    let saved;
    try { saved = JSON.parse(this.storage.getItem(this.storageKey) || "null"); } catch { saved = null; }
    if (!saved || typeof saved !== "object") return;
    for (const r of Array.isArray(saved.replies) ? saved.replies : []) {
      if (!r || typeof r.generation_id !== "string") continue;
      this.replies.set(r.generation_id, {
        conversationId: r.conversation_id, epoch: r.epoch, next: r.next | 0,
        text: String(r.text || ""), reasoning: "", ended: false, restored: true,
      });
    }
    if (Array.isArray(saved.pending)) this.pending = saved.pending.filter((p) => p && p.client_message_id);
    if (typeof saved.session_id === "string") this.sessionId = saved.session_id;
  }

  persist() {
    if (this.persistQueued) return;
    this.persistQueued = true;
    // One write per turn of the event loop, however many frames arrived.
    Promise.resolve().then(() => {
      this.persistQueued = false;
      const replies = [...this.replies.entries()]
        .filter(([, g]) => !g.ended)
        .map(([id, g]) => ({ generation_id: id, conversation_id: g.conversationId, epoch: g.epoch, next: g.next, text: g.text }));
      try {
        this.storage.setItem(this.storageKey, JSON.stringify({ replies, pending: this.pending, session_id: this.sessionId }));
      } catch {
        // Quota or denied storage: resume still works within this page.
      }
    });
  }

  /** The replies still streaming (restored ones included), for a UI to show at start. */
  inFlight() {
    return [...this.replies.entries()]
      .filter(([, g]) => !g.ended)
      .map(([generationId, g]) => ({ generationId, conversationId: g.conversationId, text: g.text }));
  }

  // ---- credentials and HTTP ---------------------------------------------

  /** The current token; one call of the hook at a time, however many callers wait. */
  credential(refresh = false) {
    if (this.token && !refresh) return Promise.resolve(this.token);
    if (!this.tokenPromise) {
      this.tokenPromise = this.fetchToken(refresh).finally(() => { this.tokenPromise = null; });
    }
    return this.tokenPromise;
  }

  async fetchToken(refresh) {
    const got = await this.getToken({ refresh });
    if (got && typeof got === "object") {
      this.token = got.token || null;
      this.tokenExpiresAt = got.expiresAt || got.expires_at || null;
    } else {
      this.token = got || null;
      this.tokenExpiresAt = null;
    }
    this.emit("token", { expiresAt: this.tokenExpiresAt });
    return this.token;
  }

  headers(extra = {}) {
    const h = { ...extra };
    if (this.token) h.authorization = `Bearer ${this.token}`;
    else if (this.user) h["x-spillway-user"] = this.user;
    return h;
  }

  /** A JSON request to the gateway; rejects with a `SpillwayError`. */
  async request(method, path, body) {
    await this.credential();
    for (let tries = 0; ; tries++) {
      const response = await this.fetchImpl(this.url + path, {
        method,
        headers: this.headers(body === undefined ? {} : { "content-type": "application/json" }),
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status === 401 && tries === 0 && this.token) {
        await this.credential(true);
        continue;
      }
      if (response.status === 204) return null;
      const json = await response.json().catch(() => null);
      if (!response.ok) throw httpError(response, json);
      return json;
    }
  }

  createConversation(fields = {}) { return this.request("POST", "/v1/conversations", fields); }
  listConversations(query = "") { return this.request("GET", "/v1/conversations" + query); }
  getConversation(id) { return this.request("GET", `/v1/conversations/${encodeURIComponent(id)}`); }

  /** Every message of a conversation, oldest first (follows the cursor pages). */
  async history(conversationId, { limit = 200, max = 1000 } = {}) {
    const messages = [];
    let after = null;
    do {
      const q = `?limit=${limit}&order=asc` + (after ? `&after=${encodeURIComponent(after)}` : "");
      const page = await this.request("GET", `/v1/conversations/${encodeURIComponent(conversationId)}/messages${q}`);
      messages.push(...page.data);
      after = page.has_more ? page.next_cursor : null;
    } while (after && messages.length < max);
    return messages;
  }

  // ---- connecting --------------------------------------------------------

  /** Opens the connection (and keeps it open until `close()`). */
  connect() {
    if (!this.closed) return;
    this.closed = false;
    this.open();
  }

  /** Closes for good (code 1000); reply state stays stored for the next page. */
  close() {
    this.closed = true;
    this.clearTimers();
    for (const controller of this.sseStreams.values()) controller.abort();
    this.sseStreams.clear();
    if (this.socket) {
      const s = this.socket;
      this.socket = null;
      try { s.close(1000, "client closed"); } catch { /* already closed */ }
    }
    this.setStatus("closed");
  }

  later(ms, fn) {
    const t = setTimeout(() => { this.timers.delete(t); fn(); }, ms);
    this.timers.add(t);
    return t;
  }

  clearTimers() {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  async open() {
    if (this.closed) return;
    this.setStatus(this.attempt === 0 ? "connecting" : "reconnecting");
    try {
      const refresh = this.needRefresh;
      this.needRefresh = false;
      await this.credential(refresh);
    } catch (err) {
      if (err instanceof SpillwayError && !err.retryable) {
        // A refused widget key or origin: asking again will not help.
        this.closed = true;
        this.setStatus("closed");
        this.emit("error", err);
        return;
      }
      this.emit("error", new SpillwayError("credentials_unavailable", String((err && err.message) || err), { retryable: true }));
      this.scheduleReconnect();
      return;
    }
    if (this.closed) return;
    const useWs = this.mode === "ws" || (this.mode === "auto" && this.WebSocketImpl && this.wsFailures < WS_FAILURES_BEFORE_SSE);
    if (useWs) this.openSocket();
    else this.openSse();
  }

  wsUrl() {
    const params = new URLSearchParams();
    if (this.token) params.set("access_token", this.token);
    else if (this.user) params.set("user", this.user);
    if (this.sessionId) params.set("session", this.sessionId);
    return this.url.replace(/^http/, "ws") + "/v1/ws?" + params.toString();
  }

  openSocket() {
    let socket;
    try {
      socket = new this.WebSocketImpl(this.wsUrl(), "spillway.v1");
    } catch {
      this.wsFailures += 1;
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    let helloSeen = false;
    let openedAt = 0;
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (frame.type === "hello") {
        helloSeen = true;
        openedAt = Date.now();
        this.onHello(frame);
      }
      this.lastSeen = Date.now();
      this.handleFrame(frame);
    };
    socket.onerror = () => { /* the close event follows */ };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.clearTimers();
      // Only a socket that never opened counts toward the SSE fallback
      // (a refused credential closes an open one with 4401).
      if (!helloSeen && (event.code === 1006 || event.code === 1015)) this.wsFailures += 1;
      else if (helloSeen && Date.now() - openedAt >= STABLE_MS) this.attempt = 0;
      this.onClose(event.code, event.reason, helloSeen);
    };
  }

  onHello(hello) {
    this.transport = "ws";
    this.wsFailures = 0;
    if (hello.session_id) this.sessionId = hello.session_id;
    this.userId = hello.user_id || this.userId;
    this.heartbeatMs = hello.heartbeat_ms || 20_000;
    this.setStatus("open");
    // Resume first, then subscribe, then resend (docs/protocol.md section 8).
    for (const [id, g] of this.replies) {
      if (!g.ended) this.write({ type: "resume", generation_id: id, epoch: g.epoch, offset: g.next });
    }
    for (const conversationId of this.subscriptions) this.write({ type: "subscribe", conversation_id: conversationId });
    for (const p of this.pending) this.write({ type: "send", ...p });
    if (this.reconnected) this.emit("resync", { conversations: [...this.subscriptions] });
    this.reconnected = true;
    this.persist();
    this.watchLiveness();
    this.scheduleRenewal();
  }

  /** Pings after `heartbeat_ms` of silence; closes a socket that stays silent. */
  watchLiveness() {
    const check = () => {
      if (!this.socket || this.transport !== "ws") return;
      const silent = Date.now() - this.lastSeen;
      if (silent >= this.heartbeatMs + PONG_TIMEOUT_MS) {
        try { this.socket.close(4000, "no answer"); } catch { /* gone */ }
        return;
      }
      if (silent >= this.heartbeatMs) this.write({ type: "ping", id: Date.now() });
      this.later(Math.min(this.heartbeatMs, PONG_TIMEOUT_MS), check);
    };
    this.later(this.heartbeatMs, check);
  }

  scheduleRenewal() {
    if (!this.tokenExpiresAt) return;
    const left = this.tokenExpiresAt * 1000 - Date.now();
    const wait = Math.max(1000, Math.min(left - RENEW_MARGIN_MS, left * 0.8));
    this.later(wait, async () => {
      try {
        const token = await this.credential(true);
        if (token && this.socket) this.write({ type: "auth", token });
      } catch {
        // The close at expiry (4401) will ask again.
      }
      this.scheduleRenewal();
    });
  }

  onClose(code, reason, helloSeen) {
    if (this.closed) return;
    switch (code) {
      case 4401: // credential missing, expired or revoked: get a new one
        this.needRefresh = true;
        break;
      case 4403: // not allowed here: retrying will not help
      case 4409: // an operator closed us: wait for the user
        this.closed = true;
        this.setStatus("closed");
        this.emit("error", new SpillwayError(code === 4403 ? "forbidden" : "disconnected", reason || String(code)));
        return;
      case 1009: // a frame was too large: drop the newest pending send
        this.pending.pop();
        this.persist();
        break;
      case 1013:
        this.emit("error", new SpillwayError("slow_consumer", "reconnecting after a slow-consumer close", { retryable: true }));
        break;
      default:
        break;
    }
    let attempt;
    if (code === 4001) attempt = 0; // lifetime reached: at once
    else if (code === 1001 || code === 1012) attempt = Math.max(this.attempt, 2); // drain: spread the herd
    if (!helloSeen && this.mode === "auto" && this.wsFailures >= WS_FAILURES_BEFORE_SSE) attempt = 0;
    this.scheduleReconnect(attempt);
  }

  scheduleReconnect(attempt) {
    if (this.closed) return;
    this.transport = null;
    this.setStatus("reconnecting");
    const n = attempt === undefined ? this.attempt : attempt;
    if (attempt === undefined || attempt >= this.attempt) this.attempt = n + 1;
    this.later(backoffDelay(n), () => this.open());
  }

  /** Network or foreground change: try at once. */
  reconnectNow() {
    this.attempt = 0;
    if (this.socket) {
      try { this.socket.close(4002, "reconnect"); } catch { /* gone */ }
    } else if (!this.closed && this.status !== "open") {
      this.clearTimers();
      this.open();
    }
  }

  write(frame) {
    if (!this.socket || this.socket.readyState !== 1) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  // ---- the SSE transport (no presence or typing) --------------------------

  openSse() {
    this.transport = "sse";
    this.setStatus("open");
    for (const [id, g] of this.replies) if (!g.ended) this.streamSse(id);
    for (const p of [...this.pending]) this.sendSse(p);
    if (this.reconnected) this.emit("resync", { conversations: [...this.subscriptions] });
    this.reconnected = true;
  }

  async sendSse(p) {
    const path = `/v1/conversations/${encodeURIComponent(p.conversation_id)}/messages`;
    const body = { content: p.content, client_message_id: p.client_message_id };
    if (p.model) body.model = p.model;
    await this.sseRequest(path, { method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json" } }, p.client_message_id);
  }

  streamSse(generationId) {
    const g = this.replies.get(generationId);
    if (!g || g.ended || this.sseStreams.has(generationId)) return;
    const q = g.next ? `?from=${g.next}&epoch=${g.epoch}` : "";
    this.sseRequest(`/v1/generations/${encodeURIComponent(generationId)}/events${q}`, { method: "GET" }, null, generationId);
  }

  async sseRequest(path, init, clientMessageId, generationId) {
    const controller = new AbortController();
    const key = generationId || clientMessageId;
    this.sseStreams.set(key, controller);
    let current = generationId;
    try {
      const response = await this.fetchImpl(this.url + path, {
        ...init, headers: this.headers({ accept: "text/event-stream", ...(init.headers || {}) }), signal: controller.signal,
      });
      if (response.status === 204) {
        // Nothing held here: if we never saw its end, the history has it.
        const g = generationId && this.replies.get(generationId);
        if (g && !g.ended) this.endWithReload(generationId);
        return;
      }
      if (!response.ok) {
        const json = await response.json().catch(() => null);
        const err = httpError(response, json, clientMessageId);
        if (response.status === 401) this.token = null;
        this.handleFrame({ type: "error", code: err.code, message: err.message, retryable: err.retryable, client_message_id: clientMessageId || undefined });
        if (err.retryable || response.status === 401) throw err;
        return;
      }
      await readEventStream(response.body, ({ event, data }) => {
        let frame;
        try { frame = JSON.parse(data); } catch { return; }
        if (event === "reconnect") throw new SpillwayError("reconnect", "the server asked to reconnect", { retryable: true });
        if (frame.generation_id) current = frame.generation_id;
        this.handleFrame(frame);
      }, controller.signal);
      const g = current && this.replies.get(current);
      if (g && !g.ended) throw new SpillwayError("stream_cut", "the stream ended early", { retryable: true });
    } catch (err) {
      if (controller.signal.aborted || this.closed) return;
      // Cut: resume the reply (or resend the message) after a backoff.
      this.sseStreams.delete(key);
      const delay = backoffDelay(this.attempt++);
      this.later(delay, () => {
        this.attempt = Math.max(0, this.attempt - 1);
        if (current && this.replies.has(current)) this.streamSse(current);
        else {
          const p = this.pending.find((x) => x.client_message_id === clientMessageId);
          if (p) this.sendSse(p);
        }
      });
      return;
    } finally {
      if (this.sseStreams.get(key) === controller) this.sseStreams.delete(key);
    }
  }

  // ---- frames -------------------------------------------------------------

  handleFrame(f) {
    switch (f.type) {
      case "ack": {
        this.pending = this.pending.filter((p) => p.client_message_id !== f.client_message_id);
        this.track(f.generation_id, f.conversation_id, f.epoch);
        this.persist();
        this.emit("ack", { clientMessageId: f.client_message_id, messageId: f.message_id, conversationId: f.conversation_id, generationId: f.generation_id });
        break;
      }
      case "reply": {
        this.track(f.generation_id, f.conversation_id, f.epoch);
        this.emit("reply", { generationId: f.generation_id, conversationId: f.conversation_id });
        break;
      }
      case "delta": case "reasoning": case "tool_call": case "usage": case "restart": case "done":
        this.onGenerationFrame(f);
        break;
      case "error":
        this.onErrorFrame(f);
        break;
      case "message":
        this.emit("message", { conversationId: f.conversation_id, message: f.message });
        break;
      case "presence":
        this.emit("presence", { conversationId: f.conversation_id, event: f.event, users: f.users, devices: f.devices });
        break;
      case "typing":
        this.emit("typing", { conversationId: f.conversation_id, userId: f.user_id, typing: f.typing });
        break;
      default:
        break; // hello, pong, authenticated, and frames of later versions
    }
  }

  track(generationId, conversationId, epoch) {
    let g = this.replies.get(generationId);
    if (!g) {
      g = { conversationId, epoch, next: 0, text: "", reasoning: "", ended: false };
      this.replies.set(generationId, g);
      this.forgetOldest();
    } else if (conversationId) {
      g.conversationId = conversationId;
    }
    return g;
  }

  forgetOldest() {
    if (this.replies.size <= MAX_TRACKED) return;
    for (const [id, g] of this.replies) {
      if (g.ended) { this.replies.delete(id); if (this.replies.size <= MAX_TRACKED) return; }
    }
    const [oldest] = this.replies.keys();
    this.replies.delete(oldest);
  }

  // docs/protocol.md section 8, "Applying a generation frame".
  onGenerationFrame(f) {
    const g = this.replies.get(f.generation_id) || this.track(f.generation_id, undefined, f.epoch);
    if (g.ended) return;
    if (f.offset < g.next) {
      if (f.offset !== 0) return;
      g.text = ""; g.reasoning = "";
    }
    const base = { generationId: f.generation_id, conversationId: g.conversationId };
    switch (f.type) {
      case "delta":
        g.text += f.text;
        g.epoch = f.epoch; g.next = f.next;
        this.emit("delta", { ...base, delta: f.text, text: g.text });
        break;
      case "reasoning":
        g.reasoning += f.text;
        g.epoch = f.epoch; g.next = f.next;
        this.emit("reasoning", { ...base, delta: f.text, reasoning: g.reasoning });
        break;
      case "restart":
        g.text = ""; g.reasoning = "";
        g.epoch = f.epoch; g.next = f.next;
        this.emit("restart", base);
        break;
      case "usage":
        g.usage = { promptTokens: f.prompt_tokens, completionTokens: f.completion_tokens };
        g.epoch = f.epoch; g.next = f.next;
        break;
      case "done":
        g.ended = true; g.finishReason = f.finish_reason;
        g.epoch = f.epoch; g.next = f.next;
        this.emit("done", { ...base, text: g.text, finishReason: f.finish_reason, usage: g.usage });
        break;
      default:
        g.epoch = f.epoch; g.next = f.next; // tool_call: tools are not offered to the model today
        break;
    }
    this.persist();
  }

  onErrorFrame(f) {
    const err = new SpillwayError(f.code, f.message, { retryable: !!f.retryable, generationId: f.generation_id, clientMessageId: f.client_message_id });
    if (f.client_message_id) {
      // A refused send: retryable ones are resent on the next connection.
      if (!f.retryable) this.pending = this.pending.filter((p) => p.client_message_id !== f.client_message_id);
      else {
        const p = this.pending.find((x) => x.client_message_id === f.client_message_id);
        if (p && this.transport === "ws") this.later(backoffDelay(Math.min(this.attempt++, 4)), () => {
          if (this.pending.includes(p)) this.write({ type: "send", ...p });
        });
      }
      this.persist();
    }
    if (f.generation_id) {
      const g = this.replies.get(f.generation_id);
      if (f.code === "reload_from_history") { this.endWithReload(f.generation_id); return; }
      if (f.code === "unavailable" && f.retryable && g && !g.ended) {
        // (fleet) Redis away: try the resume again later.
        this.later(backoffDelay(2), () => this.write({ type: "resume", generation_id: f.generation_id, epoch: g.epoch, offset: g.next }));
        return;
      }
      if (g) { g.ended = true; err.text = g.text; err.conversationId = g.conversationId; }
      this.persist();
    }
    this.emit("error", err);
  }

  endWithReload(generationId) {
    const g = this.replies.get(generationId);
    if (g) g.ended = true;
    this.persist();
    this.emit("reload", { generationId, conversationId: g && g.conversationId });
  }

  // ---- what the app calls -------------------------------------------------

  /** Receives the conversation's live events (kept across reconnects). */
  subscribe(conversationId) {
    this.subscriptions.add(conversationId);
    this.write({ type: "subscribe", conversation_id: conversationId });
  }

  unsubscribe(conversationId) {
    this.subscriptions.delete(conversationId);
    this.write({ type: "unsubscribe", conversation_id: conversationId });
  }

  /**
   * Sends a message; the reply streams to the `reply`/`delta`/`done` handlers.
   * Returns its client_message_id. Kept and resent until acknowledged.
   */
  send(conversationId, content, { model, clientMessageId } = {}) {
    const p = { conversation_id: conversationId, content, client_message_id: clientMessageId || randomId() };
    if (model || this.model) p.model = model || this.model;
    this.pending.push(p);
    this.persist();
    if (this.transport === "sse") this.sendSse(p);
    else this.write({ type: "send", ...p });
    return p.client_message_id;
  }

  /** Stops a reply, whichever device started it. */
  cancel(generationId) {
    if (this.write({ type: "cancel", generation_id: generationId })) return Promise.resolve();
    return this.request("POST", `/v1/generations/${encodeURIComponent(generationId)}/cancel`);
  }

  /** Tells the conversation's other members the user is (or stopped) typing. */
  typing(conversationId, typing = true) {
    this.write({ type: "typing", conversation_id: conversationId, typing });
  }
}

function httpError(response, json, clientMessageId) {
  const e = (json && json.error) || {};
  return new SpillwayError(e.code || `http_${response.status}`, e.message || response.statusText, {
    retryable: e.retryable === undefined ? response.status >= 500 || response.status === 429 : !!e.retryable,
    status: response.status,
    clientMessageId,
  });
}

/**
 * A `getToken` hook for a public widget key: exchanges it for an anonymous
 * visitor token (`POST /v1/widget/session`), renewing the same visitor, and
 * keeps it in `storage` (default `localStorage`) so every tab and reload of
 * the site is the same visitor.
 */
export function widgetTokens(url, key, { storage, fetch: fetchImpl } = {}) {
  const base = String(url).replace(/\/+$/, "");
  const store = storage || (() => { try { return globalThis.localStorage || memoryStorage(); } catch { return memoryStorage(); } })();
  const doFetch = fetchImpl || globalThis.fetch.bind(globalThis);
  const slot = `spillway.visitor.${key}`;
  return async ({ refresh } = {}) => {
    let saved = null;
    try { saved = JSON.parse(store.getItem(slot) || "null"); } catch { saved = null; }
    const fresh = saved && saved.token && saved.expires_at * 1000 - Date.now() > RENEW_MARGIN_MS;
    if (fresh && !refresh) return { token: saved.token, expiresAt: saved.expires_at, visitorId: saved.visitor_id };
    const headers = { "content-type": "application/json" };
    if (saved && saved.token) headers.authorization = `Bearer ${saved.token}`;
    let response = await doFetch(base + "/v1/widget/session", { method: "POST", headers, body: JSON.stringify({ key }) });
    if (response.status === 401 && headers.authorization) {
      // The old token is no good (a rotated secret): start as a new visitor.
      delete headers.authorization;
      response = await doFetch(base + "/v1/widget/session", { method: "POST", headers, body: JSON.stringify({ key }) });
    }
    const json = await response.json().catch(() => null);
    if (!response.ok) throw httpError(response, json);
    try { store.setItem(slot, JSON.stringify(json)); } catch { /* storage denied */ }
    return { token: json.token, expiresAt: json.expires_at, visitorId: json.visitor_id };
  };
}
