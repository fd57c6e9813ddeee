/**
 * A UEFI guest (OVMF, booted from the fixture's CD) live-migrates with its variables file: the
 * destination gets the NVRAM the source had, and the guest runs on with no memory error. OVMF
 * boots slowly under TCG (a minute or more on a loaded machine): the time limits are generous.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { guestIso } from '../../fixtures/guest/index.js';
import { VmLab } from '../helpers/vm.js';
import { vmPaths } from '../../src/vm/config.js';
import { expectArrived, migrateResult, PairedHosts } from './helpers.js';

const VM = 'efimover';

describe('live migration of a UEFI guest', () => {
  let h: PairedHosts;
  let a: VmLab;
  let b: VmLab;

  beforeAll(async () => {
    h = await PairedHosts.create('migu');
    ({ a, b } = h);
  }, 120_000);

  afterAll(() => h?.stop());

  it('moves with its variables file, and runs on there', async () => {
    await a.ok(['vm', 'create', VM, '--memory', '256M', '--cdrom', guestIso(), '--firmware', 'uefi', '--net', 'none', '--accel', 'tcg']);
    await a.start(VM);
    await a.waitLines(VM, 3, 240_000);
    const nvram = readFileSync(vmPaths(a.dataDir, VM).nvram);
    const r = await a.run(['--json', 'migrate', VM, 'desktop', '--max-downtime', '2000', '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(migrateResult(r.stdout).departureError ?? null).toBeNull();
    await expectArrived(b, VM);
    expect(readFileSync(vmPaths(b.dataDir, VM).nvram).equals(nvram), 'the destination has the variables file the source had').toBe(true);
    expect((await b.json<{ firmware: string }>(['vm', 'show', VM])).firmware).toBe('uefi');
    await b.ok(['vm', 'stop', VM]);
  }, 600_000);
});
