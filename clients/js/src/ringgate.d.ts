// Types of ringgate-client (src/ringgate.js). Protocol v1.

/** Any JSON value a message body may be. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A cid as the gateway echoes it: this library makes strings; other clients may use integers. */
export type Cid = string | number;

/** A localStorage-compatible, synchronous storage. */
export interface StorageAdapter {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
  removeItem(key: string): void;
}

/** Injected time (tests): the default uses Date.now / setTimeout / clearTimeout. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** The browser WebSocket surface the client uses. */
export interface WebSocketLike {
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** Optional: used by dropConnection() to cut without a close frame. */
  terminate?(): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface RinggateOptions {
  /** ws://host:port/ws or wss://host/ws */
  url: string;
  /** A JWT (static). */
  token?: string;
  /** Called before every connection attempt, and again after an auth refusal (4001). */
  getToken?: () => string | Promise<string>;
  /** Dev mode (gateway without jwt_secret, on loopback): connect as this user. */
  user?: string;
  /** `?device=<id>`; also part of the storage namespace. */
  device?: string;
  /** Ask for the big-inbox summary (`?summary=1`). */
  summary?: boolean;
  /** Put `?token=` / `?user=` in the URL instead of the first frame (default false). */
  authInUrl?: boolean;
  /** Default: globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Default: localStorage when usable, else memory. */
  storage?: StorageAdapter;
  /** Storage namespace; default: the user (JWT `sub`, dev user, or `welcome.user`) + `/device`. */
  namespace?: string;
  /** Prefix of every storage key (default `ringgate:`). */
  storagePrefix?: string;
  clock?: Clock;
  /** In [0, 1); jitter only. Default Math.random. */
  random?: () => number;
  /** Reconnect backoff: full jitter in [0, min(max, min * 2^attempt)). Defaults 500 / 30000. */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** No `welcome` this long after connecting: give the attempt up. Default 15000. */
  connectTimeoutMs?: number;
  /** Acks (and the persistence they wait for) go out this long after a message was handled (25), */
  ackDelayMs?: number;
  /** or at once when this many are waiting (64). */
  ackBatch?: number;
  /** Without a connection, how long an `accepted` is still held to be told in server order (10000); then told sorted. */
  holdMaxMs?: number;
  /** Sends unanswered at once on a connection (64); 1 after a refusal, doubling per accepted. */
  maxInFlight?: number;
  /** Outbox bounds: sends not yet accepted (1000 entries, 1 MiB of frames). */
  maxOutbox?: number;
  maxOutboxBytes?: number;
  /** Display dedup memory: last cids per sender (1000), in all (20000). */
  dedupPerSender?: number;
  dedupMax?: number;
  /** Rooms whose last offset is remembered (200). */
  maxRooms?: number;
  /** Senders with a read receipt waiting to be confirmed (1000). */
  maxReads?: number;
  /** Reconnects after which an unconfirmed receipt is given up (3). */
  readResends?: number;
}

export type State = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'stopped';

export interface ErrorEvent {
  /** A gateway error code (bad_request, unknown_op, forbidden, rate_limited, too_large,
   * unavailable, unauthorized) or a client one (storage, token, handler, unreadable, connect). */
  code: string;
  message: string;
  cid?: Cid;
  retryMs?: number;
  /** The send with this cid will be resent (unavailable, rate_limited). */
  willRetry?: boolean;
  /** The send with this cid was refused for good and left the outbox. */
  dropped?: boolean;
  start?: string;
}

export interface RinggateEvents {
  state: {
    state: State;
    /** stopped: 'client' | 'unauthorized' | 'forbidden' */
    reason?: string;
    /** the gateway's error frame behind a stop */
    error?: { op: 'error'; code: string; message: string; retry_ms?: number };
    /** connecting: failed attempts so far */
    attempt?: number;
    /** reconnecting: when, and why */
    delayMs?: number;
    code?: number;
    /** open: sends resent on this connection */
    resent?: number;
  };
  welcome: { user: string; conn: string; v: number };
  /** A direct message, shown once per (from, cid); acked after the handlers ran. */
  message: { from: string; cid: Cid; id: string; ts: number; body: Json; type?: string };
  /** The gateway took responsibility; told per recipient in server-id order (per room in
   * offset order), held while an older send to it is unanswered (README "Order of accepted"). */
  accepted: { cid: string; id: string; to?: string; room?: string; offset?: number };
  delivered: { cid: Cid; id: string; to: string };
  /** `by` has read every message of `from` up to `id` (only forward, once). */
  read: { by: string; from: string; id: string; ts: number };
  typing: { from: string };
  presence: { online: Record<string, boolean> };
  room: { room: string; offset: number; id: string; from: string; cid: Cid; ts: number; body: Json };
  joined: { room: string; offset: number; recovered: boolean };
  left: { room: string };
  /** Room messages from `from` were skipped for this client; it re-joins to recover. */
  gap: { room: string; from: number };
  summary: { total: number; senders: Array<{ from: string; count: number; oldest: { id: string; ts: number }; newest: { id: string; ts: number } }> };
  fetched: { from: string; count: number; more: boolean };
  synced: { count: number };
  error: ErrorEvent;
  /** Every frame from the gateway, parsed (debugging). */
  frame: Record<string, Json>;
}

export declare class RinggateError extends Error {
  code: 'outbox_full' | 'too_large' | 'bad_request';
}

export declare class RinggateClient {
  constructor(options: RinggateOptions);
  readonly state: State;
  /** The user the gateway welcomed (dev user before that). */
  readonly user: string | null;
  on<K extends keyof RinggateEvents>(event: K, fn: (data: RinggateEvents[K]) => void): () => void;
  off<K extends keyof RinggateEvents>(event: K, fn: (data: RinggateEvents[K]) => void): void;
  start(): void;
  stop(): void;
  /** Send to a user; returns the cid. Throws RinggateError outbox_full / too_large. */
  send(to: string, body: Json): string;
  /** Publish to a room; returns the cid. */
  publish(room: string, body: Json): string;
  /** Sends not yet accepted, in send order (restored ones included). */
  pending(): Array<{ cid: string; to?: string; room?: string; body: Json }>;
  join(room: string, options?: { since?: number }): void;
  leave(room: string): void;
  /** false when not connected (nothing sent). */
  presence(users: string[]): boolean;
  watch(users: string[]): boolean;
  unwatch(users: string[]): boolean;
  read(from: string, id: string): boolean;
  typing(to: string): boolean;
  fetch(from: string, limit?: number): boolean;
  replay(): boolean;
  /** Tests and demos: cut the connection as a network failure would. */
  dropConnection(): void;
}

export declare function createClient(options: RinggateOptions): RinggateClient;
export declare function memoryStorage(): StorageAdapter & { readonly size: number; keys(): string[] };
export declare function backoffDelay(attempt: number, minMs: number, maxMs: number, random: () => number): number;
export declare function retryDelay(retryMs: number, random: () => number): number;
export declare function compareIds(a: string, b: string): number;
export declare function jwtSubject(token: string): string | null;
export declare class SeenSet {
  constructor(perSender: number, max: number);
  readonly size: number;
  has(from: string, key: string): boolean;
  add(from: string, key: string): void;
}
export declare const DEFAULTS: Readonly<Required<Pick<RinggateOptions,
  'authInUrl' | 'summary' | 'backoffMinMs' | 'backoffMaxMs' | 'connectTimeoutMs' | 'ackDelayMs' | 'ackBatch' |
  'holdMaxMs' | 'maxInFlight' | 'maxOutbox' | 'maxOutboxBytes' | 'dedupPerSender' | 'dedupMax' | 'maxRooms' | 'maxReads' |
  'readResends' | 'storagePrefix'>>>;
export declare const CLOSE: Readonly<{ UNAUTHORIZED: 4001; FORBIDDEN: 4003; RATE_LIMITED: 4029; UNAVAILABLE: 4503 }>;
