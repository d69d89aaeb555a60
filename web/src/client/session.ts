/**
 * One member's session in one room, over the node's browser face
 * (`BrowserChat` over grpc-web, proto/web.proto): join with a proof of the
 * key, verified membership with keys, live and stored messages opened and
 * judged, posts sealed for exactly the members the node has.
 *
 * The transport is the caller's: `@connectrpc/connect-web` in the page,
 * `@connectrpc/connect-node` in tests, the same code either way. Nothing
 * here logs: plaintext, keys and the session token stay in memory.
 */
import { type Client, Code, ConnectError, type Transport, createClient } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { ChatRoom, type Delivery, type PostResult, PostSchema, type ServerFrame } from "../gen/chat_pb.js";
import type { Membership } from "../gen/common_pb.js";
import { BrowserChat, type LinkFrame } from "../gen/web_pb.js";
import { fromHex, toHex } from "../protocol/bytes.js";
import { EnvelopeError, encodeEnvelope, membershipHash, open, seal } from "../protocol/envelope.js";
import { joinProof } from "../protocol/join.js";
import { type Identity, type PublicKey, fingerprint, importPublicKey, parseHandle } from "../protocol/keys.js";
import { Streams, type Warning } from "../protocol/streams.js";
import { roomFingerprint } from "../protocol/verification.js";
import { type DeviceStore, type RoomState, emptyRoom, nextPosition } from "./device.js";

/** A member as this client verified it. */
export interface Member {
  readonly handle: string;
  /** Absent until the member first joins (nothing is wrapped for them). */
  readonly key?: PublicKey;
  readonly fingerprint?: string;
  /** This device sees this key for the first time. */
  readonly newKey: boolean;
}

/** A message that opened and verified. */
export interface Message {
  /** The node's id (UUIDv7 bytes) and the room's sequence number: the server's word. */
  readonly id: Uint8Array;
  readonly seq: bigint;
  readonly timeMs: bigint;
  /** The sender's handle (verified by signature). */
  readonly sender: string;
  readonly text: string;
  /** The sender's own clock (signed, v1.1). */
  readonly sentAtMs?: bigint;
  readonly warnings: Warning[];
  /** From stored history rather than live. */
  readonly history: boolean;
}

/** What a session tells its user. */
export interface SessionEvents {
  message?(m: Message): void;
  /** A delivery that did not open or verify: shown as a warning, never as text. */
  refused?(r: { id: Uint8Array; seq: bigint; reason: string }): void;
  members?(m: { revision: bigint; members: Member[]; fingerprint: string }): void;
  /** The session ended; `error` says why unless the user closed it. */
  ended?(error?: ConnectError): void;
}

/** Why a post was not accepted. */
export class PostError extends Error {
  override name = "PostError";
  constructor(
    message: string,
    readonly code: Code,
  ) {
    super(message);
  }
}

const RESEAL_MAX = 3;

interface Pending {
  resolve(r: PostResult): void;
  reject(e: Error): void;
}

/** An open session. */
export class Session {
  private revision = 0n;
  private members: Member[] = [];
  private readonly keys = new Map<string, PublicKey>();
  private clientSeq = 0n;
  private readonly pending = new Map<bigint, Pending>();
  private posting: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** The highest room sequence number seen (at joining, delivered, accepted): history asks for a copy holding it. */
  private seenSeq = 0n;

  private constructor(
    private readonly me: Identity,
    readonly room: string,
    private readonly web: Client<typeof BrowserChat>,
    private readonly chat: Client<typeof ChatRoom>,
    private readonly link: Uint8Array,
    private readonly token: string,
    private readonly frames: AsyncIterator<LinkFrame>,
    private readonly abort: AbortController,
    private readonly device: DeviceStore,
    private readonly deviceId: Uint8Array,
    private state: RoomState,
    private readonly streams: Streams,
    private readonly on: SessionEvents,
  ) {}

  /**
   * Joins `room` as `me`: the handshake of docs/PROTOCOL.md §3, then the
   * membership, then deliveries (the last `recent` stored messages first).
   * Throws the node's refusal (PERMISSION_DENIED for a non-member).
   */
  static async join(
    transport: Transport,
    me: Identity,
    room: string,
    device: DeviceStore,
    on: SessionEvents,
    recent = 50,
  ): Promise<Session> {
    const web = createClient(BrowserChat, transport);
    const chat = createClient(ChatRoom, transport);
    const abort = new AbortController();
    try {
      const frames = web
        .open({ chat: room, user: me.public.handleText, recent }, { signal: abort.signal })
        [Symbol.asyncIterator]();
      const first = await next(frames);
      if (first.link.length !== 32) throw protocolError("the node sent no link");
      const challenge = frameOf(await next(frames));
      if (challenge.case !== "challenge") throw protocolError("the node sent no challenge");
      const proof = await joinProof(me, room, challenge.value.nonce);
      await web.send({ link: first.link, frame: { frame: { case: "proof", value: proof } } });
      const joined = frameOf(await next(frames));
      if (joined.case !== "joined") throw protocolError("the node did not confirm the join");
      const state = (await device.load(room)) ?? emptyRoom();
      const session = new Session(
        me,
        room,
        web,
        chat,
        first.link,
        joined.value.session,
        frames,
        abort,
        device,
        await device.id(),
        state,
        Streams.restore(state.streams),
        on,
      );
      session.seenSeq = joined.value.lastSeq;
      for (const der of state.keys) {
        const key = await importPublicKey(fromHex(der));
        session.keys.set(key.handleText, key);
      }
      await session.refreshMembers();
      void session.pump();
      return session;
    } catch (e) {
      abort.abort();
      throw ConnectError.from(e);
    }
  }

  /** The membership as last verified. */
  get membership(): { revision: bigint; members: Member[] } {
    return { revision: this.revision, members: this.members };
  }

  /** Ends the session. */
  close(): void {
    this.closed = true;
    this.abort.abort();
  }

  /**
   * Seals `text` for the room's members and posts it; resolves with the
   * node's id and sequence number once stored. Posts go one at a time, in
   * the order called, so the device's numbers arrive in order.
   */
  post(text: string): Promise<{ id: Uint8Array; seq: bigint }> {
    const run = this.posting.then(() => this.postNow(text));
    this.posting = run.catch(() => undefined);
    return run;
  }

  /** Stored messages, newest first, before `beforeId` (the newest when absent). */
  async history(limit = 50, beforeId?: Uint8Array): Promise<Message[]> {
    const out: Message[] = [];
    const pages = this.chat.history({
      chat: this.room,
      session: this.token,
      limit,
      beforeId: beforeId ?? new Uint8Array(0),
      minSeq: this.seenSeq,
    });
    for await (const page of pages) {
      for (const item of page.items) {
        const m = await this.openOne(item, false, false);
        if (m) out.push(m);
      }
    }
    return out;
  }

  private async postNow(text: string): Promise<{ id: Uint8Array; seq: bigint }> {
    const body = new TextEncoder().encode(text);
    const position = nextPosition(this.deviceId, this.state);
    for (let attempt = 0; ; attempt++) {
      const recipients = this.members.flatMap((m) => (m.key ? [m.key] : []));
      const { envelope, hash } = await seal({
        me: this.me,
        room: this.room,
        revision: this.revision,
        recipients,
        body,
        position,
        sentAtMs: BigInt(Date.now()),
      });
      // The position is used up once sealed (§5.2).
      this.state = { ...this.state, seq: position.seq.toString(), prev: toHex(hash) };
      await this.save();
      const bytes = encodeEnvelope(envelope);
      const result = await this.send(bytes);
      if (result.outcome.case === "accepted") {
        if (result.outcome.value.seq > this.seenSeq) this.seenSeq = result.outcome.value.seq;
        return { id: result.outcome.value.id, seq: result.outcome.value.seq };
      }
      const rejected = result.outcome.value;
      if (!rejected) throw new PostError("the node answered nothing", Code.Internal);
      if (rejected.code === Code.FailedPrecondition && rejected.membership && attempt < RESEAL_MAX) {
        // The membership moved: check the node's, seal again at the same place.
        await this.adoptMembership(rejected.membership);
        continue;
      }
      throw new PostError(rejected.message, rejected.code as Code);
    }
  }

  private async send(envelope: Uint8Array): Promise<PostResult> {
    const clientSeq = ++this.clientSeq;
    const answer = new Promise<PostResult>((resolve, reject) => this.pending.set(clientSeq, { resolve, reject }));
    try {
      await this.web.send({
        link: this.link,
        frame: { frame: { case: "post", value: create(PostSchema, { clientSeq, envelope }) } },
      });
    } catch (e) {
      this.pending.delete(clientSeq);
      throw ConnectError.from(e);
    }
    return answer;
  }

  private async pump(): Promise<void> {
    let error: ConnectError | undefined;
    try {
      for (;;) {
        const r = await this.frames.next();
        if (r.done) break;
        await this.handle(frameOf(r.value));
      }
    } catch (e) {
      if (!this.closed) error = ConnectError.from(e);
    }
    const why = error ?? new ConnectError("the session ended", Code.Canceled);
    for (const p of this.pending.values()) p.reject(why);
    this.pending.clear();
    this.closed = true;
    this.on.ended?.(error);
  }

  private async handle(f: ServerFrame["frame"]): Promise<void> {
    switch (f.case) {
      case "deliveries":
        for (const item of f.value.items) {
          if (item.seq > this.seenSeq) this.seenSeq = item.seq;
          const m = await this.openOne(item, !f.value.history, true);
          if (m) this.on.message?.(m);
        }
        await this.save();
        break;
      case "result": {
        const p = this.pending.get(f.value.clientSeq);
        this.pending.delete(f.value.clientSeq);
        p?.resolve(f.value);
        break;
      }
      case "membershipChanged":
        if (f.value.revision > this.revision) await this.refreshMembers();
        break;
      default:
        throw protocolError(`unexpected frame ${f.case ?? "(empty)"}`);
    }
  }

  /** Opens and judges one delivery; reports a refusal and returns null. */
  private async openOne(item: Delivery, live: boolean, judge: boolean): Promise<Message | null> {
    const keyOf = (h: string) => this.keys.get(h);
    let plain;
    try {
      try {
        plain = await open(this.me, this.room, item.sealed, keyOf);
      } catch (e) {
        // A sender who joined since the membership was read: read it again.
        if (!(e instanceof EnvelopeError) || !e.message.startsWith("no key known")) throw e;
        await this.refreshMembers();
        plain = await open(this.me, this.room, item.sealed, keyOf);
      }
    } catch (e) {
      const reason = e instanceof Error ? e.message : String(e);
      this.on.refused?.({ id: item.id, seq: item.seq, reason });
      return null;
    }
    const verdict = judge
      ? this.streams.observe(plain.sender, plain.revision, plain.chain, plain.hash, live)
      : { show: true, warnings: [] };
    if (!verdict.show) return null;
    let text: string;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(plain.body);
    } catch {
      this.on.refused?.({ id: item.id, seq: item.seq, reason: "the message is not UTF-8 text" });
      return null;
    }
    return {
      id: item.id,
      seq: item.seq,
      timeMs: item.timeMs,
      sender: plain.sender,
      text,
      ...(plain.chain ? { sentAtMs: plain.chain.sentAtMs } : {}),
      warnings: verdict.warnings,
      history: !live,
    };
  }

  private async refreshMembers(): Promise<void> {
    const m = await this.chat.members({ chat: this.room, session: this.token });
    await this.adoptMembership(m);
  }

  /** Checks every key of a membership the node sent (§1) and adopts it. */
  private async adoptMembership(m: Membership): Promise<void> {
    if (m.revision < this.revision) return;
    const members: Member[] = [];
    for (const member of m.members) {
      if (member.publicKey.length === 0) {
        members.push({ handle: member.user, newKey: false });
        continue;
      }
      // Throws (ending the refresh) on a key that does not hash to its handle.
      const key = await importPublicKey(member.publicKey, parseHandle(member.user));
      const newKey = !this.keys.has(key.handleText);
      if (newKey) {
        this.keys.set(key.handleText, key);
        this.state = { ...this.state, keys: [...this.state.keys, toHex(key.der)] };
      }
      members.push({ handle: member.user, key, fingerprint: await fingerprint(key.der), newKey });
    }
    this.revision = m.revision;
    this.members = members;
    const withKeys = members.flatMap((x) => (x.key ? [x.key] : []));
    this.streams.sawMembership(m.revision, await membershipHash(this.room, m.revision, withKeys));
    await this.save();
    this.on.members?.({
      revision: m.revision,
      members,
      fingerprint: await roomFingerprint(this.room, m.revision, withKeys),
    });
  }

  private async save(): Promise<void> {
    this.state = { ...this.state, streams: this.streams.save() };
    await this.device.save(this.room, this.state);
  }
}

async function next(frames: AsyncIterator<LinkFrame>): Promise<LinkFrame> {
  const r = await frames.next();
  if (r.done) throw protocolError("the node ended the session");
  return r.value;
}

function frameOf(f: LinkFrame): ServerFrame["frame"] {
  if (!f.frame?.frame.case) throw protocolError("an empty frame");
  return f.frame.frame;
}

function protocolError(message: string): ConnectError {
  return new ConnectError(message, Code.Internal);
}
