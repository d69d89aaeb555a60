/**
 * The browser's envelope code against the Rust client's and node's, with
 * fresh keys and randomness on every run: envelopes sealed by Rust open
 * here, envelopes sealed here pass the node's checks and open in Rust, and
 * a join proof made here satisfies the node.
 *
 * The Rust side is `protocol-interop` (tests/src/bin/protocol-interop.rs),
 * found as `harness.ts` finds every binary.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { fromBase64, toBase64, toHex, utf8 } from "../src/protocol/bytes.js";
import { EnvelopeError, NO_PREVIOUS, encodeEnvelope, open, seal } from "../src/protocol/envelope.js";
import { joinProof } from "../src/protocol/join.js";
import { Streams } from "../src/protocol/streams.js";
import { bin } from "./harness.js";
import { type Identity, type PublicKey, generateIdentity, identityFromPkcs8, pem, unpem } from "../src/protocol/keys.js";

const V = JSON.parse(readFileSync(new URL("../../../docs/protocol-vectors.json", import.meta.url), "utf8"));
function rust(request: object): { ok: true; reply: any } | { ok: false; error: string } {
  const run = spawnSync(bin("protocol-interop"), [], { input: JSON.stringify(request), encoding: "utf8", timeout: 120_000 });
  if (run.error) throw run.error;
  return run.status === 0 ? { ok: true, reply: JSON.parse(run.stdout) } : { ok: false, error: run.stderr };
}

async function people(): Promise<{ alice: Identity; bob: Identity; alicePem: string; bobPem: string }> {
  const [a, b] = V.keys;
  return {
    alice: await identityFromPkcs8(unpem("PRIVATE KEY", a.private_pkcs8_pem)),
    bob: await identityFromPkcs8(unpem("PRIVATE KEY", b.private_pkcs8_pem)),
    alicePem: a.private_pkcs8_pem,
    bobPem: b.private_pkcs8_pem,
  };
}

function keyOf(...keys: PublicKey[]): (handle: string) => PublicKey | undefined {
  return (h) => keys.find((k) => k.handleText === h);
}

const randomDevice = () => crypto.getRandomValues(new Uint8Array(16));

test("envelopes sealed by the Rust client open here", async () => {
  const { alice, bob, alicePem } = await people();
  const body = "from Rust to the browser: ünïcödé ✓";
  const prev = crypto.getRandomValues(new Uint8Array(32));
  const r = rust({
    op: "seal",
    sender_pem: alicePem,
    room: "interop.room_1",
    revision: 7,
    recipients_spki: [toBase64(bob.public.der), toBase64(alice.public.der)],
    plaintext: body,
    device_hex: toHex(randomDevice()),
    device_seq: 3,
    prev_hash_hex: toHex(prev),
    sent_at_ms: Date.now(),
  });
  assert.ok(r.ok, !r.ok ? r.error : "");
  for (const me of [alice, bob]) {
    const sealed = fromBase64(r.reply.sealed[me.public.handleText]);
    const plain = await open(me, "interop.room_1", sealed, keyOf(alice.public));
    assert.equal(new TextDecoder().decode(plain.body), body);
    assert.equal(plain.sender, alice.public.handleText);
    assert.equal(plain.chain?.seq, 3n);
    assert.equal(toHex(plain.chain!.prev), toHex(prev));
    assert.equal(toHex(plain.hash), r.reply.message_hash_hex);
  }
  // Rust's envelope to bob, opened with a key that is not alice's: refused.
  const sealed = fromBase64(r.reply.sealed[bob.public.handleText]);
  const forged = { ...bob.public, handleText: alice.public.handleText, handle: alice.public.handle };
  await assert.rejects(open(bob, "interop.room_1", sealed, keyOf(forged)), EnvelopeError);
});

test("envelopes v1, as older clients sealed them, open here without the v1.1 fields", async () => {
  const { alice, bob, alicePem } = await people();
  const r = rust({
    op: "seal",
    version: 1,
    sender_pem: alicePem,
    room: "old-room",
    revision: 2,
    recipients_spki: [toBase64(alice.public.der), toBase64(bob.public.der)],
    plaintext: "stored long ago",
  });
  assert.ok(r.ok, !r.ok ? r.error : "");
  const plain = await open(bob, "old-room", fromBase64(r.reply.sealed[bob.public.handleText]), keyOf(alice.public));
  assert.equal(new TextDecoder().decode(plain.body), "stored long ago");
  assert.equal(plain.chain, null);
  assert.equal(toHex(plain.hash), r.reply.message_hash_hex);
  // The stream checks show it as unsequenced, as the CLI does.
  assert.deepEqual(new Streams().observe(plain.sender, plain.revision, plain.chain, plain.hash, true).warnings, [
    { kind: "unsequenced" },
  ]);
});

test("envelopes sealed here pass the node's checks and open in the Rust client", async () => {
  const { alice, bob, bobPem } = await people();
  // A key made by this runtime's WebCrypto sends; published keys receive.
  const { identity: carol, pkcs8 } = await generateIdentity();
  const body = "from the browser to Rust: ünïcödé ✓ ".repeat(40);
  const { envelope, hash } = await seal({
    me: carol,
    room: "interop",
    revision: 12n,
    recipients: [alice.public, bob.public, carol.public],
    body: utf8(body),
    position: { device: randomDevice(), seq: 1n, prev: NO_PREVIOUS },
    sentAtMs: BigInt(Date.now()),
  });
  const bytes = toBase64(encodeEnvelope(envelope));
  const carolPem = pem("PRIVATE KEY", pkcs8);
  for (const recipientPem of [bobPem, V.keys[0].private_pkcs8_pem, carolPem]) {
    const r = rust({
      op: "open",
      recipient_pem: recipientPem,
      room: "interop",
      envelope: bytes,
      sender_spki: toBase64(carol.public.der),
    });
    assert.ok(r.ok, !r.ok ? r.error : "");
    assert.equal(r.reply.plaintext, body);
    assert.equal(r.reply.sender, carol.public.handleText);
    assert.equal(r.reply.device_seq, 1);
    assert.equal(r.reply.message_hash_hex, toHex(hash));
  }
  // A bit flipped anywhere the signature covers: Rust refuses it.
  const tampered = encodeEnvelope(envelope);
  tampered[tampered.length - 40]! ^= 1;
  const r = rust({
    op: "open",
    recipient_pem: bobPem,
    room: "interop",
    envelope: toBase64(tampered),
    sender_spki: toBase64(carol.public.der),
  });
  assert.equal(r.ok, false);
  // Sealed under another key than the one registered for the sender: refused.
  const wrongSender = rust({
    op: "open",
    recipient_pem: bobPem,
    room: "interop",
    envelope: bytes,
    sender_spki: toBase64(alice.public.der),
  });
  assert.equal(wrongSender.ok, false);
});

test("a join proof made here satisfies the node", async () => {
  const { identity: dave } = await generateIdentity();
  const nonce = crypto.getRandomValues(new Uint8Array(32));
  const proof = await joinProof(dave, "lobby", nonce);
  const request = {
    op: "verify_join",
    room: "lobby",
    user: dave.public.handleText,
    nonce_hex: toHex(nonce),
    public_key: toBase64(proof.publicKey),
    signature: toBase64(proof.signature),
  };
  const r = rust(request);
  assert.ok(r.ok, !r.ok ? r.error : "");
  // The same proof for another room, or another nonce, is refused.
  assert.equal(rust({ ...request, room: "other" }).ok, false);
  nonce[0]! ^= 1;
  assert.equal(rust({ ...request, nonce_hex: toHex(nonce) }).ok, false);
});
