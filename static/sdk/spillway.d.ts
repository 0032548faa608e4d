// Types of the Spillway client SDK (static/sdk/spillway.js). The wire
// protocol itself is docs/protocol.md; this is the SDK's surface.

export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed";
export type Transport = "auto" | "ws" | "sse";

/** What `getToken` may resolve to: a token, a token with its expiry (Unix seconds), or null (development mode). */
export type TokenResult = string | { token: string; expiresAt?: number | null } | null;

/** Key/value storage with the Web Storage interface (sessionStorage, AsyncStorage adapters). */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

export interface ClientOptions {
  /** The gateway's base URL, e.g. "https://chat.example.com". */
  url: string;
  /** Supplies the credential; called at connect, on 4401 (refresh: true) and before expiry. */
  getToken?: (context: { refresh: boolean }) => Promise<TokenResult> | TokenResult;
  /** The user name in development mode (no credentials). */
  user?: string;
  /** "auto" (default): WebSocket, falling back to SSE-over-fetch when it cannot connect. */
  transport?: Transport;
  /** The default model of `send`. */
  model?: string;
  /** Where reply state survives a reload (default: sessionStorage). */
  storage?: StorageLike;
  /** The storage key (default "spillway.v1"). */
  storageKey?: string;
  /** WebSocket implementation (React Native, tests). */
  WebSocket?: typeof WebSocket;
  /** fetch implementation; must stream response bodies for the SSE transport. */
  fetch?: typeof fetch;
}

export interface Message {
  id: string;
  object: "message";
  conversation_id: string;
  role: "user" | "assistant" | "system";
  content: string;
  status: "complete" | "aborted" | "failed";
  model: string | null;
  provider: string | null;
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number; estimated: boolean } | null;
  cost_usd: number | null;
  client_message_id: string | null;
  generation_id: string | null;
  created_at: number;
}

export interface Conversation {
  id: string;
  object: "conversation";
  title: string | null;
  metadata: Record<string, unknown>;
  created_at: number;
  updated_at: number;
}

export interface ReplyRef { generationId: string; conversationId?: string }
export interface DeltaEvent extends ReplyRef { delta: string; text: string }
export interface DoneEvent extends ReplyRef {
  text: string;
  finishReason: string;
  usage?: { promptTokens: number; completionTokens: number };
}
export interface PresenceEvent { conversationId: string; event: "snapshot" | "join" | "leave"; users: string[]; devices: number }
export interface TypingEvent { conversationId: string; userId: string; typing: boolean }
export interface AckEvent { clientMessageId: string; messageId: string; conversationId: string; generationId: string }
export interface MessageEvent { conversationId: string; message: Message }
export interface StatusEvent { status: Status; transport: "ws" | "sse" | null }

export interface EventMap {
  status: StatusEvent;
  ack: AckEvent;
  reply: ReplyRef;
  delta: DeltaEvent;
  reasoning: ReplyRef & { delta: string; reasoning: string };
  restart: ReplyRef;
  done: DoneEvent;
  error: SpillwayError;
  message: MessageEvent;
  presence: PresenceEvent;
  typing: TypingEvent;
  /** A reply cannot be resumed exactly: re-read the conversation's history. */
  reload: ReplyRef;
  /** Reconnected: messages sent meanwhile are in the history, not replayed. */
  resync: { conversations: string[] };
  token: { expiresAt: number | null };
}

export class SpillwayError extends Error {
  /** Stable code (docs/protocol.md section 14), or "http_<status>". */
  code: string;
  retryable: boolean;
  status?: number;
  generationId?: string;
  clientMessageId?: string;
  /** For a terminal reply error: the partial text received. */
  text?: string;
  conversationId?: string;
}

export class SpillwayClient {
  constructor(options: ClientOptions);
  readonly status: Status;
  /** The transport in use once open. */
  readonly transport: "ws" | "sse" | null;
  on<K extends keyof EventMap>(name: K, handler: (event: EventMap[K]) => void): () => void;
  onDelta(handler: (event: DeltaEvent) => void): () => void;
  onDone(handler: (event: DoneEvent) => void): () => void;
  onError(handler: (event: SpillwayError) => void): () => void;
  onPresence(handler: (event: PresenceEvent) => void): () => void;
  onTyping(handler: (event: TypingEvent) => void): () => void;
  onMessage(handler: (event: MessageEvent) => void): () => void;
  onStatus(handler: (event: StatusEvent) => void): () => void;
  connect(): void;
  close(): void;
  /** Network came back or the app returned to the foreground: reconnect at once. */
  reconnectNow(): void;
  subscribe(conversationId: string): void;
  unsubscribe(conversationId: string): void;
  /** Returns the message's client_message_id; the message is resent until acknowledged. */
  send(conversationId: string, content: string, options?: { model?: string; clientMessageId?: string }): string;
  cancel(generationId: string): Promise<void>;
  typing(conversationId: string, typing?: boolean): void;
  /** Replies still streaming, including those restored after a reload. */
  inFlight(): Array<{ generationId: string; conversationId?: string; text: string }>;
  createConversation(fields?: { title?: string; metadata?: Record<string, unknown> }): Promise<Conversation>;
  listConversations(query?: string): Promise<{ object: "list"; data: Conversation[]; next_cursor: string | null; has_more: boolean }>;
  getConversation(id: string): Promise<Conversation>;
  history(conversationId: string, options?: { limit?: number; max?: number }): Promise<Message[]>;
  request<T = unknown>(method: string, path: string, body?: unknown): Promise<T>;
}

/** A getToken hook for a public widget key (anonymous visitor tokens, kept in localStorage). */
export function widgetTokens(
  url: string,
  key: string,
  options?: { storage?: StorageLike; fetch?: typeof fetch },
): (context: { refresh: boolean }) => Promise<{ token: string; expiresAt: number; visitorId: string }>;

/** Reconnect delay for an attempt: uniform in [0, min(30 s, 0.5 s * 2^attempt)). */
export function backoffDelay(attempt: number, random?: () => number): number;

export function randomId(): string;
