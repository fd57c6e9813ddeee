import { describe, expect, it } from 'vitest';
import { COLD_VERSION, negotiateVersion, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN } from '../../src/migration/version.js';

describe('migration protocol version rule', () => {
  it('picks the highest version both ranges hold', () => {
    expect(negotiateVersion({ min: 1, max: 3 }, { min: 2, max: 5 })).toBe(3);
    expect(negotiateVersion({ min: 1, max: 1 }, { min: 1, max: 4 })).toBe(1);
    expect(negotiateVersion({ min: 4, max: 9 }, { min: 1, max: 5 })).toBe(5);
  });

  it('refuses ranges that do not overlap, and malformed ranges', () => {
    expect(negotiateVersion({ min: 1, max: 1 }, { min: 2, max: 3 })).toBeNull();
    expect(negotiateVersion({ min: 4, max: 5 }, { min: 1, max: 3 })).toBeNull();
    expect(negotiateVersion({ min: 3, max: 2 }, { min: 1, max: 9 })).toBeNull();
    expect(negotiateVersion({ min: 0, max: 0 }, { min: 0, max: 9 })).toBeNull();
  });

  it('this build speaks a non-empty range starting at 1 or later', () => {
    expect(PROTOCOL_VERSION_MIN).toBeGreaterThanOrEqual(1);
    expect(PROTOCOL_VERSION_MAX).toBeGreaterThanOrEqual(PROTOCOL_VERSION_MIN);
    expect(negotiateVersion({ min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION_MAX }, { min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION_MAX })).toBe(PROTOCOL_VERSION_MAX);
  });

  it('cold migration needs version 2; a version-1 peer still agrees on 1 (live only)', () => {
    expect(COLD_VERSION).toBe(2);
    expect(PROTOCOL_VERSION_MAX).toBeGreaterThanOrEqual(COLD_VERSION);
    expect(PROTOCOL_VERSION_MIN).toBe(1);
    expect(negotiateVersion({ min: 1, max: 1 }, { min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION_MAX })).toBe(1);
  });
});
