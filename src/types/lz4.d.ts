declare module 'lz4' {
  export function encodeBound(size: number): number;
  /** Returns the compressed size, or 0 when the input does not compress. */
  export function encodeBlock(input: Uint8Array, output: Uint8Array): number;
  /** Returns the decoded size, or a negative number on malformed input. */
  export function decodeBlock(input: Uint8Array, output: Uint8Array): number;
}
