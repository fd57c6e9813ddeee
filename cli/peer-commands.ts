/**
 * `vmsnap peer`: this host's identity and the hosts it is paired with, for migration between hosts
 * (src/migration/identity.ts). Pairing is pinning a fingerprint, as with SSH host keys: run
 * `vmsnap peer id` on each host and `vmsnap peer add` the other's fingerprint on both.
 */
import type { Command } from 'commander';
import { addPeer, listPeers, loadOrCreateIdentity, removePeer } from '../src/migration/identity.js';
import { UsageError } from '../src/store/errors.js';
import { dataDir, type GlobalOptions } from './context.js';
import { printJson } from './output.js';

type Globals = () => GlobalOptions;

export function registerPeerCommands(program: Command, globals: Globals): void {
  const peer = program.command('peer').description('this host\'s identity and the hosts it may migrate VMs to and from');

  peer
    .command('id')
    .description("print this host's key fingerprint (created on first use) for the other host's `peer add`")
    .action(async () => {
      const id = await loadOrCreateIdentity(dataDir());
      if (globals().json) printJson({ fingerprint: id.fingerprint });
      else console.log(id.fingerprint);
    });

  peer
    .command('add <name>')
    .description('pair with a host: pin its fingerprint (both hosts must add each other)')
    .requiredOption('--fingerprint <fp>', "the other host's `vmsnap peer id`, SHA256:…")
    .option('--address <host:port>', 'where its `vmsnap receive` listens')
    .action(async (name: string, o: { fingerprint: string; address?: string }) => {
      const added = await addPeer(dataDir(), { name, fingerprint: o.fingerprint, ...(o.address ? { address: o.address } : {}) });
      if (globals().json) printJson(added);
      else console.log(`paired with ${added.name} (${added.fingerprint})`);
    });

  peer
    .command('ls')
    .description('list paired hosts')
    .action(async () => {
      const peers = await listPeers(dataDir());
      if (globals().json) printJson(peers);
      else for (const p of peers) console.log(`${p.name}\t${p.fingerprint}\t${p.address ?? '-'}\t${p.added}`);
    });

  peer
    .command('rm <name>')
    .description('unpair a host: it can no longer migrate VMs to or from this one')
    .action(async (name: string) => {
      if (!(await removePeer(dataDir(), name))) throw new UsageError(`no paired host named ${JSON.stringify(name)} (see \`vmsnap peer ls\`)`);
      if (!globals().json) console.log(`unpaired ${name}`);
    });
}
