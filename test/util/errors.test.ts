/** Which errors the CLI prints as one line (user-facing) and which it reports as bugs. */
import { describe, expect, it } from 'vitest';
import { isUserFacing } from '../../cli/output.js';
import { VolumeCliError } from '../../cli/volume-commands.js';
import { VolumeCreateError, VolumeIoError, VolumeOpenError, VolumeRangeError, VolumeRestoreError } from '../../src/cow/volume.js';
import { CloneError, SnapshotError } from '../../src/cow/snapshot.js';
import { DiskStreamError } from '../../src/cow/chunk-store.js';
import { SnapshotCaptureError, SnapshotRestoreError } from '../../src/hypervisor/snapshot.js';
import { QemuDetectError, QemuLaunchError, UnsupportedQemuError } from '../../src/hypervisor/qemu.js';
import { MigrationStreamError } from '../../src/migstream/index.js';
import { RamCaptureError } from '../../src/vm/ram-store.js';
import { SizeError } from '../../src/util/size.js';
import { PathEscapeError } from '../../src/util/fs.js';
import { IntegrityError, UsageError } from '../../src/store/errors.js';
import { BackendError } from '../../src/store/backend/contract.js';

describe('isUserFacing', () => {
  it('accepts repository, backend and marked errors of every layer', () => {
    const make: (() => Error)[] = [
      () => new VolumeCliError('x'),
      () => new VolumeCreateError('x'),
      () => new VolumeOpenError('x'),
      () => new VolumeRangeError('x'),
      () => new VolumeRestoreError('x'),
      () => new CloneError('x'),
      () => new SnapshotError('x'),
      () => new DiskStreamError('x'),
      () => new SnapshotCaptureError('stream', 'x'),
      () => new SnapshotRestoreError('load', 'x'),
      () => new QemuDetectError('x'),
      () => new QemuLaunchError('x', ''),
      () => new UnsupportedQemuError('x'),
      () => new MigrationStreamError('x', 0),
      () => new RamCaptureError('x'),
      () => new SizeError('x'),
      () => new PathEscapeError('x'),
      () => new IntegrityError('x'),
      () => new UsageError('x'),
      () => new BackendError('x', false),
    ];
    for (const m of make) expect(isUserFacing(m()), m().name).toBe(true);
  });

  it('refuses internal errors (bugs keep their stack)', () => {
    for (const e of [new Error('x'), new TypeError('x'), new VolumeIoError('x'), 'a string', null, { userFacing: 'yes' }]) {
      expect(isUserFacing(e)).toBe(false);
    }
  });
});
