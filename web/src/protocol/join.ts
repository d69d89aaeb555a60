/** Joining a room (docs/PROTOCOL.md §3): the proof of key possession. */
import { concat, domain, framedRoom } from "./bytes.js";
import { type Identity, sign } from "./keys.js";

/** Bytes of the node's challenge nonce. */
export const CHALLENGE_BYTES = 32;

/** `"saferchat/join/v1\0" ‖ u16 len(room) ‖ room ‖ handle (32) ‖ nonce (32)`. */
export function joinSigningInput(room: string, handle: Uint8Array, nonce: Uint8Array): Uint8Array {
  if (handle.length !== 32 || nonce.length !== CHALLENGE_BYTES) throw new RangeError("bad handle or nonce");
  return concat(domain("saferchat/join/v1"), framedRoom(room), handle, nonce);
}

/** The `Proof` answer to a `Challenge`: the key and a signature over the input. */
export async function joinProof(
  me: Identity,
  room: string,
  nonce: Uint8Array,
): Promise<{ publicKey: Uint8Array; signature: Uint8Array }> {
  const signature = await sign(me, joinSigningInput(room, me.public.handle, nonce));
  return { publicKey: me.public.der, signature };
}
