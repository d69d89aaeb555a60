/**
 * The protocol test vectors (docs/protocol-vectors.json), checked against
 * the browser's implementation under the runtime's WebCrypto (Node's in
 * `vectors.test.ts`, Chromium's in `browser.test.ts`): every
 * deterministic value recomputed, every randomized RSA output checked the
 * way a recipient checks it, and the sealed delivery opened.
 */
import { assert } from "./check.js";
import { fromBinary, toBinary } from "@bufbuild/protobuf";
import { EnvelopeSchema, SealedSchema } from "../src/gen/envelope_pb.js";
import { fromBase64, fromHex, toHex, utf8 } from "../src/protocol/bytes.js";
import {
  EnvelopeError,
  associatedData,
  keyCommitment,
  membershipHash,
  messageHash,
  open,
  sealWith,
  signingInput,
  wrapLabel,
} from "../src/protocol/envelope.js";
import { joinSigningInput } from "../src/protocol/join.js";
import {
  type Identity,
  type PublicKey,
  fingerprint,
  identityFromPkcs8,
  importPublicKey,
  parseHandle,
  unpem,
  unwrap,
  verify,
} from "../src/protocol/keys.js";
import { leafHash, path, root, rootFromPath } from "../src/protocol/merkle.js";
import { roomFingerprint, safetyNumber } from "../src/protocol/verification.js";

/** One named check. */
export interface Check {
  readonly name: string;
  run(): Promise<void>;
}

/** The checks of the vectors file `V` (docs/protocol-vectors.json, parsed: untyped JSON). */
export function vectorChecks(V: any): Check[] {
  const E = V.envelope_v1_1;
  const checks: Check[] = [];
  const test = (name: string, run: () => Promise<void>) => checks.push({ name, run });

  async function people(): Promise<{ alice: Identity; bob: Identity }> {
    const [alice, bob] = await Promise.all(
      V.keys.map((k: { private_pkcs8_pem: string }) => identityFromPkcs8(unpem("PRIVATE KEY", k.private_pkcs8_pem))),
    );
    return { alice: alice!, bob: bob! };
  }

  function keyOf(...ids: Identity[]): (handle: string) => PublicKey | undefined {
    return (h) => ids.find((i) => i.public.handleText === h)?.public;
  }

  test("keys: handle, fingerprint and public key of each published key", async () => {
    for (const k of V.keys) {
      const id = await identityFromPkcs8(unpem("PRIVATE KEY", k.private_pkcs8_pem));
      assert.equal(id.public.handleText, k.handle, k.name);
      assert.equal(toHex(id.public.handle), k.handle_hex);
      assert.equal(toHex(id.public.der), toHex(fromBase64(k.public_spki_der_b64)));
      assert.equal(await fingerprint(id.public.der), k.fingerprint);
      assert.equal(toHex(parseHandle(k.handle)), k.handle_hex);
      const pub = await importPublicKey(fromBase64(k.public_spki_der_b64), fromHex(k.handle_hex));
      assert.equal(pub.handleText, k.handle);
    }
  });

  test("keys: a key that does not hash to the claimed handle is refused", async () => {
    const [a, b] = V.keys;
    await assert.rejects(importPublicKey(fromBase64(a.public_spki_der_b64), fromHex(b.handle_hex)), /does not hash/);
    await assert.rejects(importPublicKey(Uint8Array.of(0x30, 0x03, 0x02, 0x01, 0x01)), /does not parse/);
    assert.throws(() => parseHandle("short"), /not a handle/);
  });

  test("join: the signing input and alice's signature", async () => {
    const { alice } = await people();
    const input = joinSigningInput(V.join.room, parseHandle(V.join.user), fromHex(V.join.nonce_hex));
    assert.equal(toHex(input), V.join.signing_input_hex);
    assert.ok(await verify(alice.public, input, fromHex(V.join.signature_hex)));
    const flipped = fromHex(V.join.signature_hex);
    flipped[0]! ^= 1;
    assert.equal(await verify(alice.public, input, flipped), false);
  });

  test("merkle: leaves, roots and every audit path of 1 to 5 leaves", async () => {
    for (const tree of V.merkle) {
      const leaves = [];
      for (const l of tree.leaves) {
        const h = await leafHash(fromHex(l.recipient_hex), fromHex(l.wrapped_hex));
        assert.equal(toHex(h), l.leaf_hash_hex);
        leaves.push(h);
      }
      assert.equal(toHex(await root(leaves)), tree.root_hex);
      for (let i = 0; i < leaves.length; i++) {
        const p = await path(leaves, i);
        assert.deepEqual(p.map(toHex), tree.paths_hex[i]);
        const back = await rootFromPath(leaves[i]!, i, leaves.length, p);
        assert.equal(back && toHex(back), tree.root_hex);
        // The same path under another index or count does not fit, or gives another root.
        const other = await rootFromPath(leaves[i]!, (i + 1) % (leaves.length + 1), leaves.length, p);
        assert.notEqual(other && toHex(other), tree.root_hex);
      }
    }
  });

  test("envelope v1.1: every deterministic value, sealed again with the vector's key and nonce", async () => {
    const { alice, bob } = await people();
    const revision = BigInt(E.revision);
    const chainFields = {
      device: fromHex(E.device_hex),
      seq: BigInt(E.device_seq),
      prev: fromHex(E.prev_hash_hex),
    };
    const { envelope, hash } = await sealWith(
      {
        me: alice,
        room: E.room,
        revision,
        recipients: [bob.public, alice.public],
        body: utf8(E.plaintext_utf8),
        position: chainFields,
        sentAtMs: BigInt(E.sent_at_ms),
      },
      fromHex(E.content_key_hex),
      fromHex(E.nonce_hex),
    );
    assert.equal(toHex(envelope.ciphertext), E.ciphertext_hex);
    assert.equal(toHex(envelope.membershipHash), E.membership_hash_hex);
    assert.equal(toHex(envelope.keyCommitment), E.key_commitment_hex);
    assert.equal(envelope.sender, E.sender);
    assert.notEqual(toHex(hash), E.message_hash_hex, "the signature's randomized wraps change the root");
    assert.deepEqual(
      envelope.keys.map((k) => k.recipient),
      E.wrapped_keys.map((k: { recipient: string }) => k.recipient),
    );
    const chain = {
      ...chainFields,
      sentAtMs: BigInt(E.sent_at_ms),
      membership: fromHex(E.membership_hash_hex),
      keyCommitment: fromHex(E.key_commitment_hex),
    };
    assert.equal(toHex(associatedData(E.room, alice.public.handle, revision, chain)), E.associated_data_hex);
    assert.equal(toHex(await membershipHash(E.room, revision, [alice.public, bob.public])), E.membership_hash_hex);
    assert.equal(toHex(await keyCommitment(fromHex(E.content_key_hex))), E.key_commitment_hex);
    // The vector's own wraps: labels, unwrapping, the Merkle root over them.
    const leaves = [];
    for (const k of E.wrapped_keys) {
      const who = k.recipient === alice.public.handleText ? alice : bob;
      const label = wrapLabel(E.room, revision, who.public.handle);
      assert.equal(toHex(label), k.oaep_label_hex);
      const key = await unwrap(who, fromHex(k.wrapped_hex), label);
      assert.equal(key && toHex(key), E.content_key_hex);
      assert.equal(await unwrap(who, fromHex(k.wrapped_hex), new Uint8Array(0)), null, "v1.1 wraps need the label");
      leaves.push(await leafHash(who.public.handle, fromHex(k.wrapped_hex)));
    }
    const merkleRoot = await root(leaves);
    assert.equal(toHex(merkleRoot), E.merkle_root_hex);
    const input = await signingInput(
      E.room,
      alice.public.handle,
      revision,
      fromHex(E.nonce_hex),
      fromHex(E.ciphertext_hex),
      leaves.length,
      merkleRoot,
      chain,
    );
    assert.equal(toHex(input), E.signing_input_hex);
    assert.equal(toHex(await messageHash(input)), E.message_hash_hex);
    assert.ok(await verify(alice.public, input, fromHex(E.signature_hex)));
  });

  test("envelope v1.1: the protobuf bytes decode and encode again byte for byte", async () => {
    const bytes = fromBase64(E.envelope_b64);
    const envelope = fromBinary(EnvelopeSchema, bytes);
    assert.equal(envelope.version, 2);
    assert.equal(toHex(envelope.signature), E.signature_hex);
    assert.equal(toHex(toBinary(EnvelopeSchema, envelope)), toHex(bytes));
    // A `Sealed` is only ever decoded by a client. (Encoders may order its
    // fields differently: the Rust node writes them in the order the .proto
    // declares them; nothing signs protobuf bytes, only the signing input.)
    const sealed = fromBinary(SealedSchema, fromBase64(E.sealed_for_bob_b64));
    assert.equal(sealed.keyCount, 2);
    assert.equal(sealed.key?.recipient, V.keys[1].handle);
    assert.equal(toHex(sealed.signature), E.signature_hex);
  });

  test("envelope v1.1: bob opens the sealed delivery; anything altered is refused", async () => {
    const { alice, bob } = await people();
    const sealed = fromBase64(E.sealed_for_bob_b64);
    const plain = await open(bob, E.room, sealed, keyOf(alice, bob));
    assert.equal(new TextDecoder().decode(plain.body), E.plaintext_utf8);
    assert.equal(plain.sender, E.sender);
    assert.equal(toHex(plain.hash), E.message_hash_hex);
    assert.equal(plain.chain?.seq, BigInt(E.device_seq));
    // Not for alice; not in another room; no key for the sender.
    await assert.rejects(open(alice, E.room, sealed, keyOf(alice, bob)), EnvelopeError);
    await assert.rejects(open(bob, "other", sealed, keyOf(alice, bob)), /not other/);
    await assert.rejects(open(bob, E.room, sealed, keyOf(bob)), /no key known/);
    // Every field a server could alter.
    const s = fromBinary(SealedSchema, sealed);
    const alterations: Array<[string, () => void]> = [
      ["ciphertext", () => (s.ciphertext[0]! ^= 1)],
      ["nonce", () => (s.nonce[0]! ^= 1)],
      ["revision", () => (s.revision += 1n)],
      ["key index", () => (s.keyIndex ^= 1)],
      ["key count", () => (s.keyCount += 1)],
      ["proof", () => (s.proof[0]![0]! ^= 1)],
      ["device_seq", () => (s.deviceSeq += 1n)],
      ["prev_hash", () => (s.prevHash[0]! ^= 1)],
      ["sent_at", () => (s.sentAtMs += 1n)],
      ["membership hash", () => (s.membershipHash[0]! ^= 1)],
      ["key commitment", () => (s.keyCommitment[0]! ^= 1)],
      ["wrapped key", () => (s.key!.wrapped[5]! ^= 1)],
      ["signature", () => (s.signature[0]! ^= 1)],
      ["version", () => (s.version = 1)],
    ];
    for (const [what, alter] of alterations) {
      const copy = fromBinary(SealedSchema, sealed);
      Object.assign(s, copy);
      alter();
      await assert.rejects(open(bob, E.room, toBinary(SealedSchema, s), keyOf(alice, bob)), EnvelopeError, what);
    }
  });

  test("verification: safety number and room fingerprint", async () => {
    const { alice, bob } = await people();
    assert.equal(await safetyNumber(alice.public, bob.public), V.verification.safety_number_alice_bob);
    assert.equal(await safetyNumber(bob.public, alice.public), V.verification.safety_number_alice_bob);
    assert.equal(
      await roomFingerprint("team", 5n, [bob.public, alice.public]),
      V.verification.room_fingerprint_team_revision_5,
    );
  });
  return checks;
}
