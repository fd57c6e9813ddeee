/**
 * Child for the volume lock race test: loads, says "ready", opens the volume when told "go" on
 * stdin, says "opened" (and keeps the volume open until killed) or "error <message>".
 */
import { Volume } from '../../../src/cow/volume.js';

const dir = process.argv[2]!;
process.stdout.write('ready\n');
process.stdin.once('data', () => {
  Volume.open(dir).then(
    () => process.stdout.write('opened\n'),
    (err: Error) => process.stdout.write(`error ${err.message}\n`),
  );
});
