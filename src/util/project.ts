/** Where this vmsnap installation lives (package.json, bin/, native helpers built by setup). */
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

export function projectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, 'package.json'))) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error('cannot find the vmsnap installation root');
    dir = up;
  }
  return dir;
}

/** A native helper built by scripts/setup.sh, or null when it is not there (not built here). */
export function nativeHelper(name: string): string | null {
  const p = path.join(projectRoot(), '.cache', 'native', name);
  return existsSync(p) ? p : null;
}
