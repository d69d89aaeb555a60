/**
 * The key file: PKCS#8 `ENCRYPTED PRIVATE KEY` PEM (RFC 5958 §3, PBES2 of
 * RFC 8018 with PBKDF2-HMAC-SHA-256 and AES-256-CBC), byte-compatible with
 * the files the CLI writes (docs/PROTOCOL.md §1), so one key moves between
 * the CLI and a browser in either direction.
 *
 * WebCrypto does PBKDF2 and AES-CBC but not the ASN.1 around them. The
 * DER here covers exactly this one structure, whose shape is fixed; a
 * general ASN.1 library would be many times the size of the page's code.
 */
import { concat, equal, fromHex } from "./bytes.js";
import { KeyError, pem, unpem } from "./keys.js";

/** PBKDF2 iterations of files made here: the CLI's. */
export const ITERATIONS = 600_000;
/** Iterations accepted when reading: a file asking for more would hang the page. */
const ITERATIONS_MAX = 10_000_000;

const OID_PBES2 = oid("2a864886f70d01050d"); // 1.2.840.113549.1.5.13
const OID_PBKDF2 = oid("2a864886f70d01050c"); // 1.2.840.113549.1.5.12
const OID_HMAC_SHA256 = oid("2a864886f70d0209"); // 1.2.840.113549.2.9
const OID_AES256_CBC = oid("60864801650304012a"); // 2.16.840.1.101.3.4.1.42

function oid(hex: string): Uint8Array {
  return fromHex(hex);
}

// --- DER: one tag-length-value at a time -----------------------------------

const SEQUENCE = 0x30;
const INTEGER = 0x02;
const OCTET_STRING = 0x04;
const NULL = 0x05;
const OBJECT = 0x06;

function tlv(tag: number, content: Uint8Array): Uint8Array {
  const n = content.length;
  let length: Uint8Array;
  if (n < 0x80) length = Uint8Array.of(n);
  else if (n < 0x100) length = Uint8Array.of(0x81, n);
  else if (n < 0x10000) length = Uint8Array.of(0x82, n >> 8, n & 0xff);
  else throw new KeyError("DER value too long");
  return concat(Uint8Array.of(tag), length, content);
}

function integer(n: number): Uint8Array {
  const bytes: number[] = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v % 256);
  if (bytes.length === 0 || bytes[0]! >= 0x80) bytes.unshift(0);
  return tlv(INTEGER, Uint8Array.from(bytes));
}

/** A reader over DER bytes; every method throws `KeyError` on anything unexpected. */
class Der {
  private at = 0;
  constructor(private readonly bytes: Uint8Array) {}

  done(): boolean {
    return this.at === this.bytes.length;
  }

  peekTag(): number | undefined {
    return this.bytes[this.at];
  }

  /** The content of the next value, which must have `tag`. */
  take(tag: number): Uint8Array {
    const b = this.bytes;
    if (b[this.at] !== tag) throw new KeyError("not an encrypted PKCS#8 key file");
    let i = this.at + 1;
    const first = b[i++];
    if (first === undefined) throw new KeyError("truncated key file");
    let n = first;
    if (first & 0x80) {
      const count = first & 0x7f;
      if (count < 1 || count > 2) throw new KeyError("bad DER length");
      n = 0;
      for (let k = 0; k < count; k++) n = n * 256 + (b[i++] ?? Number.NaN);
    }
    if (!Number.isFinite(n) || i + n > b.length) throw new KeyError("truncated key file");
    this.at = i + n;
    return b.subarray(i, i + n);
  }

  sequence(): Der {
    return new Der(this.take(SEQUENCE));
  }

  expectOid(expected: Uint8Array, what: string): void {
    if (!equal(this.take(OBJECT), expected)) throw new KeyError(`unsupported key file: not ${what}`);
  }

  integer(): number {
    const content = this.take(INTEGER);
    if (content.length === 0 || content.length > 6 || content[0]! & 0x80) throw new KeyError("bad DER integer");
    return content.reduce((n, b) => n * 256 + b, 0);
  }
}

// --- The key file -----------------------------------------------------------

async function aesKey(passphrase: string, salt: Uint8Array, iterations: number): Promise<CryptoKey> {
  const base = await crypto.subtle.importKey(
    "raw",
    new TextEncoder().encode(passphrase) as BufferSource,
    "PBKDF2",
    false,
    ["deriveKey"],
  );
  return crypto.subtle.deriveKey(
    { name: "PBKDF2", salt: salt as BufferSource, iterations, hash: "SHA-256" },
    base,
    { name: "AES-CBC", length: 256 },
    false,
    ["encrypt", "decrypt"],
  );
}

/** Encrypts PKCS#8 DER under `passphrase` as the CLI does; returns the PEM text. */
export async function encryptKeyFile(pkcs8: Uint8Array, passphrase: string, iterations = ITERATIONS): Promise<string> {
  if (passphrase.length === 0) throw new KeyError("the passphrase is empty");
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(16));
  const key = await aesKey(passphrase, salt, iterations);
  const data = new Uint8Array(
    await crypto.subtle.encrypt({ name: "AES-CBC", iv: iv as BufferSource }, key, pkcs8 as BufferSource),
  );
  const kdf = tlv(
    SEQUENCE,
    concat(
      tlv(OBJECT, OID_PBKDF2),
      tlv(
        SEQUENCE,
        concat(
          tlv(OCTET_STRING, salt),
          integer(iterations),
          tlv(SEQUENCE, concat(tlv(OBJECT, OID_HMAC_SHA256), tlv(NULL, new Uint8Array(0)))),
        ),
      ),
    ),
  );
  const cipher = tlv(SEQUENCE, concat(tlv(OBJECT, OID_AES256_CBC), tlv(OCTET_STRING, iv)));
  const algorithm = tlv(SEQUENCE, concat(tlv(OBJECT, OID_PBES2), tlv(SEQUENCE, concat(kdf, cipher))));
  return pem("ENCRYPTED PRIVATE KEY", tlv(SEQUENCE, concat(algorithm, tlv(OCTET_STRING, data))));
}

/**
 * Decrypts a key file: `ENCRYPTED PRIVATE KEY` PEM (the CLI's format) to
 * PKCS#8 DER. A wrong passphrase and a damaged file give the same error,
 * as they do in the CLI.
 */
export async function decryptKeyFile(text: string, passphrase: string): Promise<Uint8Array> {
  const outer = new Der(unpem("ENCRYPTED PRIVATE KEY", text)).sequence();
  const algorithm = outer.sequence();
  algorithm.expectOid(OID_PBES2, "PBES2");
  const params = algorithm.sequence();
  const kdf = params.sequence();
  kdf.expectOid(OID_PBKDF2, "PBKDF2");
  const kdfParams = kdf.sequence();
  const salt = kdfParams.take(OCTET_STRING);
  const iterations = kdfParams.integer();
  if (iterations < 1 || iterations > ITERATIONS_MAX) throw new KeyError(`unsupported key file: ${iterations} iterations`);
  if (kdfParams.peekTag() === INTEGER && kdfParams.integer() !== 32) {
    throw new KeyError("unsupported key file: key length is not 32");
  }
  if (kdfParams.done()) throw new KeyError("unsupported key file: PBKDF2 with HMAC-SHA-1");
  const prf = kdfParams.sequence();
  prf.expectOid(OID_HMAC_SHA256, "PBKDF2 with HMAC-SHA-256");
  const cipher = params.sequence();
  cipher.expectOid(OID_AES256_CBC, "AES-256-CBC");
  const iv = cipher.take(OCTET_STRING);
  if (iv.length !== 16) throw new KeyError("bad AES-CBC IV");
  const data = outer.take(OCTET_STRING);
  const key = await aesKey(passphrase, salt, iterations);
  const refused = new KeyError("wrong passphrase, or not an encrypted PKCS#8 RSA key");
  let pkcs8: Uint8Array;
  try {
    pkcs8 = new Uint8Array(
      await crypto.subtle.decrypt({ name: "AES-CBC", iv: iv as BufferSource }, key, data as BufferSource),
    );
  } catch {
    throw refused;
  }
  // A wrong passphrase still ends in valid CBC padding about once in 256
  // tries, and then "decrypts" to garbage: only a key that parses counts.
  try {
    await crypto.subtle.importKey("pkcs8", pkcs8 as BufferSource, { name: "RSA-PSS", hash: "SHA-256" }, false, [
      "sign",
    ]);
  } catch {
    throw refused;
  }
  return pkcs8;
}
