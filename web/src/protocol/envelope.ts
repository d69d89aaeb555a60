/**
 * Envelopes v1 and v1.1 (docs/PROTOCOL.md §5, §6): sealing a message for
 * every member and opening one sealed for this user, byte for byte as the
 * Rust client does. Pure functions over WebCrypto: no I/O, no state; the
 * stream checks across messages are in `stream.ts`.
 */
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  type Envelope,
  EnvelopeSchema,
  type Sealed,
  SealedSchema,
  WrappedKeySchema,
} from "../gen/envelope_pb.js";
import { compare, concat, domain, equal, framedRoom, sha256, u32, u64 } from "./bytes.js";
import { type Identity, type PublicKey, parseHandle, sign, unwrap, verify, wrap } from "./keys.js";
import { leafHash, rootFromPath, root, wellFormed } from "./merkle.js";

/** Wire version of envelope v1. */
export const VERSION_1 = 1;
/** Wire version of envelope v1.1. */
export const VERSION_1_1 = 2;
/** Largest body, in bytes of UTF-8. */
export const PLAINTEXT_BYTES_MAX = 64 * 1024;
const TAG_BYTES = 16;
const NONCE_BYTES = 12;
const DEVICE_BYTES = 16;
const RSA_OUTPUT_BYTES_MAX = 512;
/** Most members a room has (and keys an envelope carries). */
export const ROOM_MEMBERS_MAX = 1000;
/** `prev_hash` of a device's first message in a room. */
export const NO_PREVIOUS = new Uint8Array(32);

/** Why an envelope was refused: a tampered or malformed message. */
export class EnvelopeError extends Error {
  override name = "EnvelopeError";
}

/** A room name is 1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`. */
export function validRoom(room: string): boolean {
  return /^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/.test(room);
}

/** Where a message goes in its sender's stream (§5.2). */
export interface Position {
  /** 16 bytes naming the sending device. */
  readonly device: Uint8Array;
  /** 1, 2, 3, … per device and room. */
  readonly seq: bigint;
  /** Message hash of the device's previous message in the room. */
  readonly prev: Uint8Array;
}

/** The v1.1 fields of an envelope. */
export interface Chain extends Position {
  readonly sentAtMs: bigint;
  readonly membership: Uint8Array;
  readonly keyCommitment: Uint8Array;
}

/** `membership_hash` (§5.3) of the members with keys (any order). */
export async function membershipHash(room: string, revision: bigint, members: PublicKey[]): Promise<Uint8Array> {
  const sorted = byHandle(members);
  const parts = [domain("saferchat/membership/v1.1"), framedRoom(room), u64(revision), u32(sorted.length)];
  for (const m of sorted) {
    if (m.der.length > 0xffff) throw new EnvelopeError("member key too long");
    parts.push(m.handle, Uint8Array.of(m.der.length >> 8, m.der.length & 0xff), m.der);
  }
  return sha256(...parts);
}

/** `key_commitment` (§5.3). */
export function keyCommitment(contentKey: Uint8Array): Promise<Uint8Array> {
  return sha256(domain("saferchat/key-commitment/v1.1"), contentKey);
}

/** The OAEP label of a v1.1 wrap for `recipient` (§5.3). */
export function wrapLabel(room: string, revision: bigint, recipient: Uint8Array): Uint8Array {
  return concat(domain("saferchat/wrap/v1.1"), framedRoom(room), u64(revision), recipient);
}

/** The AES-GCM associated data (§5.1 step 2). */
export function associatedData(room: string, sender: Uint8Array, revision: bigint, chain: Chain | null): Uint8Array {
  const v = chain ? "saferchat/body/v1.1" : "saferchat/body/v1";
  const head = concat(domain(v), framedRoom(room), sender, u64(revision));
  return chain ? concat(head, chain.device, u64(chain.seq)) : head;
}

/** The signing input (§5.1 step 5). */
export async function signingInput(
  room: string,
  sender: Uint8Array,
  revision: bigint,
  nonce: Uint8Array,
  ciphertext: Uint8Array,
  keyCount: number,
  merkleRoot: Uint8Array,
  chain: Chain | null,
): Promise<Uint8Array> {
  const v = chain ? "saferchat/envelope/v1.1" : "saferchat/envelope/v1";
  const head = concat(
    domain(v),
    framedRoom(room),
    sender,
    u64(revision),
    nonce,
    await sha256(ciphertext),
    u32(keyCount),
    merkleRoot,
  );
  if (!chain) return head;
  return concat(
    head,
    chain.device,
    u64(chain.seq),
    chain.prev,
    u64(chain.sentAtMs),
    chain.membership,
    chain.keyCommitment,
  );
}

/** `message hash = SHA-256(signing input)` (§5.4). */
export function messageHash(input: Uint8Array): Promise<Uint8Array> {
  return sha256(input);
}

function byHandle(members: PublicKey[]): PublicKey[] {
  const sorted = [...members].sort((a, b) => compare(a.handle, b.handle));
  return sorted.filter((m, i) => i === 0 || !equal(m.handle, sorted[i - 1]!.handle));
}

function randomBytes(n: number): Uint8Array {
  return crypto.getRandomValues(new Uint8Array(n));
}

/** What `seal` needs besides the message: the sender's stream and clock. */
export interface SealInput {
  readonly me: Identity;
  readonly room: string;
  readonly revision: bigint;
  /** Every member with a key at `revision`, the sender included. */
  readonly recipients: PublicKey[];
  readonly body: Uint8Array;
  readonly position: Position;
  readonly sentAtMs: bigint;
}

/** A sealed envelope and its message hash (how the device's next names it). */
export interface Sealing {
  readonly envelope: Envelope;
  readonly hash: Uint8Array;
}

/** Seals `body` as envelope v1.1 with a fresh content key and nonce. */
export function seal(input: SealInput): Promise<Sealing> {
  return sealWith(input, randomBytes(32), randomBytes(NONCE_BYTES));
}

/**
 * Seals with a given content key and nonce. Only for test vectors: a
 * content key or nonce used twice breaks AES-GCM.
 */
export async function sealWith(input: SealInput, contentKey: Uint8Array, nonce: Uint8Array): Promise<Sealing> {
  const { me, room, revision, body, position } = input;
  if (!validRoom(room)) throw new EnvelopeError(`not a room name: ${JSON.stringify(room)}`);
  if (body.length === 0) throw new EnvelopeError("message is empty");
  if (body.length > PLAINTEXT_BYTES_MAX) {
    throw new EnvelopeError(`message is ${body.length} bytes; the limit is ${PLAINTEXT_BYTES_MAX}`);
  }
  const recipients = byHandle(input.recipients);
  if (recipients.length === 0) throw new EnvelopeError("nobody to send to: no member has joined yet");
  if (position.device.length !== DEVICE_BYTES || position.prev.length !== 32 || position.seq < 1n) {
    throw new EnvelopeError("bad device position");
  }
  if (contentKey.length !== 32 || nonce.length !== NONCE_BYTES) throw new EnvelopeError("bad key or nonce");
  const chain: Chain = {
    ...position,
    sentAtMs: input.sentAtMs,
    membership: await membershipHash(room, revision, recipients),
    keyCommitment: await keyCommitment(contentKey),
  };
  const sender = me.public.handle;
  const aesKey = await crypto.subtle.importKey("raw", contentKey as BufferSource, "AES-GCM", false, ["encrypt"]);
  const ciphertext = new Uint8Array(
    await crypto.subtle.encrypt(
      {
        name: "AES-GCM",
        iv: nonce as BufferSource,
        additionalData: associatedData(room, sender, revision, chain) as BufferSource,
      },
      aesKey,
      body as BufferSource,
    ),
  );
  const keys = [];
  for (const r of recipients) {
    const wrapped = await wrap(r, contentKey, wrapLabel(room, revision, r.handle));
    keys.push(create(WrappedKeySchema, { recipient: r.handleText, wrapped }));
  }
  const leaves = await Promise.all(keys.map((k, i) => leafHash(recipients[i]!.handle, k.wrapped)));
  const input_ = await signingInput(room, sender, revision, nonce, ciphertext, keys.length, await root(leaves), chain);
  const envelope = create(EnvelopeSchema, {
    version: VERSION_1_1,
    room,
    sender: me.public.handleText,
    revision,
    nonce,
    ciphertext,
    keys,
    signature: await sign(me, input_),
    device: chain.device,
    deviceSeq: chain.seq,
    prevHash: chain.prev,
    sentAtMs: chain.sentAtMs,
    membershipHash: chain.membership,
    keyCommitment: chain.keyCommitment,
  });
  return { envelope, hash: await messageHash(input_) };
}

/** The protobuf bytes of an envelope (what `Post.envelope` carries). */
export function encodeEnvelope(envelope: Envelope): Uint8Array {
  return toBinary(EnvelopeSchema, envelope);
}

/** A verified, decrypted message. */
export interface Plain {
  /** The sender's handle text (verified by the signature). */
  readonly sender: string;
  readonly body: Uint8Array;
  readonly revision: bigint;
  /** v1.1: the sender's stream, membership hash and clock; null for v1. */
  readonly chain: Chain | null;
  /** SHA-256 of what the sender signed: how its next message names it. */
  readonly hash: Uint8Array;
}

function chainOf(s: Sealed): Chain | null {
  if (s.version === VERSION_1) {
    const absent =
      s.device.length === 0 &&
      s.deviceSeq === 0n &&
      s.prevHash.length === 0 &&
      s.sentAtMs === 0n &&
      s.membershipHash.length === 0 &&
      s.keyCommitment.length === 0;
    if (!absent) throw new EnvelopeError("v1 carries v1.1 fields");
    return null;
  }
  if (s.version !== VERSION_1_1) throw new EnvelopeError(`unknown envelope version ${s.version}`);
  if (s.device.length !== DEVICE_BYTES) throw new EnvelopeError("device must be 16 bytes");
  if (s.prevHash.length !== 32) throw new EnvelopeError("prev_hash must be 32 bytes");
  if (s.deviceSeq === 0n) throw new EnvelopeError("device_seq starts at 1");
  if ((s.deviceSeq === 1n) !== equal(s.prevHash, NO_PREVIOUS)) {
    throw new EnvelopeError("prev_hash is 32 zero bytes exactly when device_seq is 1");
  }
  if (s.membershipHash.length !== 32) throw new EnvelopeError("membership_hash must be 32 bytes");
  if (s.keyCommitment.length !== 32) throw new EnvelopeError("key_commitment must be 32 bytes");
  return {
    device: s.device,
    seq: s.deviceSeq,
    prev: s.prevHash,
    sentAtMs: s.sentAtMs,
    membership: s.membershipHash,
    keyCommitment: s.keyCommitment,
  };
}

/**
 * Checks and decrypts a `Sealed` meant for `me` in `room` (§6, in that
 * order; nothing is decrypted before the signature verifies).
 * `senderKey` gives the key registered for a handle (checked against the
 * handle when it was learnt).
 */
export async function open(
  me: Identity,
  room: string,
  bytes: Uint8Array,
  senderKey: (handle: string) => PublicKey | undefined,
): Promise<Plain> {
  let s: Sealed;
  try {
    s = fromBinary(SealedSchema, bytes);
  } catch (e) {
    throw new EnvelopeError(`does not decode: ${(e as Error).message}`);
  }
  // 1. Structure.
  const chain = chainOf(s);
  if (!validRoom(s.room)) throw new EnvelopeError("invalid room name");
  if (s.room !== room) throw new EnvelopeError(`message is for room ${s.room}, not ${room}`);
  let sender: Uint8Array;
  try {
    sender = parseHandle(s.sender);
  } catch {
    throw new EnvelopeError("invalid sender handle");
  }
  if (s.nonce.length !== NONCE_BYTES) throw new EnvelopeError("nonce must be 12 bytes");
  if (s.ciphertext.length <= TAG_BYTES) throw new EnvelopeError("empty body");
  if (s.ciphertext.length > PLAINTEXT_BYTES_MAX + TAG_BYTES) throw new EnvelopeError("body too large");
  const rsaLength = (b: Uint8Array) => b.length > 0 && b.length <= RSA_OUTPUT_BYTES_MAX;
  if (!rsaLength(s.signature)) throw new EnvelopeError("bad signature length");
  const key = s.key;
  if (!key) throw new EnvelopeError("no wrapped key");
  if (key.recipient !== me.public.handleText) throw new EnvelopeError("the wrapped key is for someone else");
  if (!rsaLength(key.wrapped)) throw new EnvelopeError("bad wrapped key length");
  if (s.keyCount === 0 || s.keyCount > ROOM_MEMBERS_MAX || !wellFormed(s.proof)) {
    throw new EnvelopeError("the audit path does not fit");
  }
  // 2. The Merkle root from this recipient's leaf, and the signing input.
  const merkleRoot = await rootFromPath(
    await leafHash(me.public.handle, key.wrapped),
    s.keyIndex,
    s.keyCount,
    s.proof,
  );
  if (!merkleRoot) throw new EnvelopeError("the audit path does not fit");
  const input = await signingInput(room, sender, s.revision, s.nonce, s.ciphertext, s.keyCount, merkleRoot, chain);
  // 3. The signature, with the key registered for the sender.
  const signer = senderKey(s.sender);
  if (!signer) throw new EnvelopeError(`no key known for sender ${s.sender}`);
  if (!equal(signer.handle, sender)) throw new EnvelopeError("the sender's key belongs to another handle");
  if (!(await verify(signer, input, s.signature))) throw new EnvelopeError("signature does not verify");
  // 4. The content key (v1.1: under the wrap label).
  const label = chain ? wrapLabel(room, s.revision, me.public.handle) : new Uint8Array(0);
  const contentKey = await unwrap(me, key.wrapped, label);
  if (!contentKey || contentKey.length !== 32) throw new EnvelopeError("the content key does not unwrap");
  // 5. v1.1: the key the sender committed to.
  if (chain && !equal(await keyCommitment(contentKey), chain.keyCommitment)) {
    throw new EnvelopeError(
      "the content key does not match the key the sender committed to (a forged wrapped key?)",
    );
  }
  // 6. The body.
  const aesKey = await crypto.subtle.importKey("raw", contentKey as BufferSource, "AES-GCM", false, ["decrypt"]);
  let body: Uint8Array;
  try {
    body = new Uint8Array(
      await crypto.subtle.decrypt(
        {
          name: "AES-GCM",
          iv: s.nonce as BufferSource,
          additionalData: associatedData(room, sender, s.revision, chain) as BufferSource,
        },
        aesKey,
        s.ciphertext as BufferSource,
      ),
    );
  } catch {
    throw new EnvelopeError("body does not decrypt (tampered?)");
  }
  return { sender: s.sender, body, revision: s.revision, chain, hash: await messageHash(input) };
}
