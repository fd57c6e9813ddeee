/**
 * The migration protocol's version rule.
 *
 * A version is one integer. Each host speaks a contiguous range PROTOCOL_VERSION_MIN..MAX; the
 * client offers its range in its hello, the server picks the highest version both speak, or refuses
 * the connection naming both ranges. So:
 *  - a change that an older peer could misread (a new message type it would have to understand, a
 *    changed body layout, a new required phase) raises MAX, and the code keeps speaking the older
 *    versions it still lists until MIN is raised;
 *  - MIN is raised only when a version is dropped on purpose, never silently;
 *  - a message an older version cannot carry is simply not sent on a channel of that version
 *    (`channel.version` says which was agreed).
 * The test beside this rule (test/migration/version.test.ts) pins the negotiation outcomes.
 */
export const PROTOCOL_VERSION_MIN = 1;
export const PROTOCOL_VERSION_MAX = 3;

/**
 * Version 2 adds cold migration: REQUEST `mode: "cold"` (and `start`), after which the source sends
 * only disk rounds and SENT_ALL (no RAM). A version-1 destination would start QEMU for an incoming
 * RAM stream that never comes, so a cold request is never sent on a version-1 channel; a live one
 * is the same in both versions.
 */
export const COLD_VERSION = 2;

/**
 * Version 3 adds RAM_MIX: raw stream bytes and page references in one record. Versions 1 and 2
 * carry them as alternating RAM_RAW and RAM_REF records — and since every referenced page is
 * preceded by its raw record header, that is two records per referenced page (a warm return
 * trip's RAM phase took 24 s instead of 11 on that). On a version 1 or 2 channel the source still
 * sends RAM_RAW and RAM_REF; a destination refuses RAM_MIX on such a channel.
 */
export const MIX_VERSION = 3;

export interface VersionRange {
  min: number;
  max: number;
}

/** The highest version in both ranges, or null when they do not overlap (or a range is empty). */
export function negotiateVersion(offered: VersionRange, spoken: VersionRange): number | null {
  if (offered.min < 1 || offered.min > offered.max || spoken.min > spoken.max) return null;
  const best = Math.min(offered.max, spoken.max);
  return best >= Math.max(offered.min, spoken.min) ? best : null;
}
