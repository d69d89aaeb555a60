/**
 * Keys and handles (docs/PROTOCOL.md §1, §2) with WebCrypto: a user is an
 * RSA-2048 key pair; the handle is SHA-256 of the modulus.
 *
 * WebCrypto binds a key to one algorithm, so one RSA key is imported
 * twice: as RSA-PSS (signatures) and as RSA-OAEP (key wrapping).
 */
import { fromBase64, sha256, toBase64, toBase64Url, toHex } from "./bytes.js";

/** RSA public exponent every saferchat key uses. */
const EXPONENT = Uint8Array.of(1, 0, 1);
/** Modulus size of keys this client makes. */
export const MODULUS_BITS = 2048;

const PSS = { name: "RSA-PSS", hash: "SHA-256" } as const;
const OAEP = { name: "RSA-OAEP", hash: "SHA-256" } as const;

/** Why a key was refused. */
export class KeyError extends Error {
  override name = "KeyError";
}

/** A member's public key, checked against its handle. */
export interface PublicKey {
  /** SubjectPublicKeyInfo DER, as registered (what membership hashes cover). */
  readonly der: Uint8Array;
  /** SHA-256 of the modulus: 32 bytes. */
  readonly handle: Uint8Array;
  /** The handle as base64url text (43 characters). */
  readonly handleText: string;
  /** For verifying signatures. */
  readonly verifyKey: CryptoKey;
  /** For wrapping content keys. */
  readonly wrapKey: CryptoKey;
}

/** A user's own key pair. */
export interface Identity {
  readonly public: PublicKey;
  /** RSA-PSS private key. */
  readonly signKey: CryptoKey;
  /** RSA-OAEP private key (the same RSA key). */
  readonly unwrapKey: CryptoKey;
}

/** Handle bytes of a modulus: SHA-256 of it without leading zero bytes. */
export async function handleOfModulus(n: Uint8Array): Promise<Uint8Array> {
  let i = 0;
  while (i < n.length - 1 && n[i] === 0) i++;
  return sha256(n.subarray(i));
}

/** The handle text of handle bytes. */
export function handleText(handle: Uint8Array): string {
  if (handle.length !== 32) throw new KeyError("a handle is 32 bytes");
  return toBase64Url(handle);
}

/** Parses handle text (43 characters of base64url) into its 32 bytes. */
export function parseHandle(text: string): Uint8Array {
  if (!/^[A-Za-z0-9_-]{43}$/.test(text)) throw new KeyError(`not a handle: ${JSON.stringify(text)}`);
  const bytes = fromBase64(text);
  // Reject non-canonical text (stray bits in the last character).
  if (toBase64Url(bytes) !== text) throw new KeyError(`not a handle: ${JSON.stringify(text)}`);
  return bytes;
}

/** The fingerprint people compare: 16 bytes of SHA-256(SPKI) in hex groups. */
export async function fingerprint(der: Uint8Array): Promise<string> {
  const hex = toHex((await sha256(der)).subarray(0, 16));
  return hex.match(/.{4}/g)!.join(" ");
}

/**
 * Imports a SubjectPublicKeyInfo DER. With `expected`, the key must hash
 * to that handle: a server cannot slip in a key of its own.
 */
export async function importPublicKey(der: Uint8Array, expected?: Uint8Array): Promise<PublicKey> {
  let verifyKey: CryptoKey;
  let wrapKey: CryptoKey;
  try {
    verifyKey = await crypto.subtle.importKey("spki", der as BufferSource, PSS, true, ["verify"]);
    wrapKey = await crypto.subtle.importKey("spki", der as BufferSource, OAEP, false, ["encrypt"]);
  } catch (e) {
    throw new KeyError(`member key does not parse: ${(e as Error).message}`);
  }
  const jwk = await crypto.subtle.exportKey("jwk", verifyKey);
  const e = fromBase64(jwk.e ?? "");
  if (toHex(e) !== toHex(EXPONENT)) throw new KeyError("member key's public exponent is not 65537");
  const handle = await handleOfModulus(fromBase64(jwk.n ?? ""));
  if (expected !== undefined && toHex(handle) !== toHex(expected)) {
    throw new KeyError(
      `the server gave a key for ${handleText(expected)} that does not hash to that handle`,
    );
  }
  return { der: new Uint8Array(der), handle, handleText: handleText(handle), verifyKey, wrapKey };
}

/**
 * An identity from an unencrypted PKCS#8 DER private key. The imported
 * private keys are not extractable unless asked: a page that keeps them
 * in IndexedDB keeps them that way.
 */
export async function identityFromPkcs8(pkcs8: Uint8Array, extractable = false): Promise<Identity> {
  let signKey: CryptoKey;
  let unwrapKey: CryptoKey;
  try {
    signKey = await crypto.subtle.importKey("pkcs8", pkcs8 as BufferSource, PSS, extractable, ["sign"]);
    unwrapKey = await crypto.subtle.importKey("pkcs8", pkcs8 as BufferSource, OAEP, extractable, [
      "decrypt",
    ]);
  } catch (e) {
    throw new KeyError(`not a PKCS#8 RSA private key: ${(e as Error).message}`);
  }
  // The public half, from the private key's JWK (n and e only).
  const probe = await crypto.subtle.importKey("pkcs8", pkcs8 as BufferSource, PSS, true, ["sign"]);
  const jwk = await crypto.subtle.exportKey("jwk", probe);
  const publicJwk: JsonWebKey = { kty: "RSA", n: jwk.n!, e: jwk.e!, alg: "PS256", ext: true };
  const verifyKey = await crypto.subtle.importKey("jwk", publicJwk, PSS, true, ["verify"]);
  const der = new Uint8Array(await crypto.subtle.exportKey("spki", verifyKey));
  return { public: await importPublicKey(der), signKey, unwrapKey };
}

/** A fresh RSA-2048 identity and its PKCS#8 DER (to save, encrypted). */
export async function generateIdentity(): Promise<{ identity: Identity; pkcs8: Uint8Array }> {
  const pair = await crypto.subtle.generateKey(
    { ...PSS, modulusLength: MODULUS_BITS, publicExponent: EXPONENT },
    true,
    ["sign", "verify"],
  );
  const pkcs8 = new Uint8Array(await crypto.subtle.exportKey("pkcs8", pair.privateKey));
  return { identity: await identityFromPkcs8(pkcs8), pkcs8 };
}

/** Signs with RSA-PSS-SHA256, 32-byte salt (§2). */
export async function sign(id: Identity, input: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(
    await crypto.subtle.sign({ name: "RSA-PSS", saltLength: 32 }, id.signKey, input as BufferSource),
  );
}

/** Verifies an RSA-PSS-SHA256 signature (§2). */
export async function verify(key: PublicKey, input: Uint8Array, signature: Uint8Array): Promise<boolean> {
  try {
    return await crypto.subtle.verify(
      { name: "RSA-PSS", saltLength: 32 },
      key.verifyKey,
      signature as BufferSource,
      input as BufferSource,
    );
  } catch {
    return false;
  }
}

/** Wraps a content key with RSA-OAEP-SHA256 under `label` (empty in v1). */
export async function wrap(key: PublicKey, contentKey: Uint8Array, label: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(
    await crypto.subtle.encrypt(
      { name: "RSA-OAEP", label: label as BufferSource },
      key.wrapKey,
      contentKey as BufferSource,
    ),
  );
}

/** Unwraps a content key; `null` when it does not unwrap. */
export async function unwrap(id: Identity, wrapped: Uint8Array, label: Uint8Array): Promise<Uint8Array | null> {
  try {
    return new Uint8Array(
      await crypto.subtle.decrypt(
        { name: "RSA-OAEP", label: label as BufferSource },
        id.unwrapKey,
        wrapped as BufferSource,
      ),
    );
  } catch {
    return null;
  }
}

/** PEM armour of DER (`label` e.g. "PUBLIC KEY"). */
export function pem(label: string, der: Uint8Array): string {
  const lines = toBase64(der).match(/.{1,64}/g) ?? [];
  return `-----BEGIN ${label}-----\n${lines.join("\n")}\n-----END ${label}-----\n`;
}

/** DER inside PEM armour with `label`; throws when absent. */
export function unpem(label: string, text: string): Uint8Array {
  const m = text.match(new RegExp(`-----BEGIN ${label}-----([^-]*)-----END ${label}-----`));
  if (!m) throw new KeyError(`no ${label} PEM block`);
  return fromBase64(m[1]!.replace(/\s+/g, ""));
}
