/*
 * die-with-parent PPID PROGRAM [ARGS...] — execs PROGRAM so that the kernel kills it (SIGKILL)
 * when the process PPID (the one that spawned this wrapper) dies.
 *
 * Why: a VM's QEMU must not outlive its supervisor. An orphaned QEMU keeps the guest running with
 * no one serving its disks, and when `vm start` brings up a new supervisor the orphan reconnects
 * to the new NBD socket: two guests then write one disk. Node cannot set PR_SET_PDEATHSIG on a
 * child it spawns, so this wrapper sets it and then execs (the setting survives execve for a
 * program that is not set-uid).
 *
 * Race: if the parent died between fork and prctl, no signal will ever come; getppid() then no
 * longer returns PPID (the orphan was re-parented), and the wrapper exits instead of exec'ing.
 * Exit status 125 for its own failures (usage, prctl, parent gone), 127 when exec fails.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: die-with-parent PPID PROGRAM [ARGS...]\n");
    return 125;
  }
  char *end = NULL;
  long ppid = strtol(argv[1], &end, 10);
  if (!end || *end || ppid <= 1) {
    fprintf(stderr, "die-with-parent: bad parent pid %s\n", argv[1]);
    return 125;
  }
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) {
    fprintf(stderr, "die-with-parent: prctl(PR_SET_PDEATHSIG): %s\n", strerror(errno));
    return 125;
  }
  if ((long)getppid() != ppid) {
    fprintf(stderr, "die-with-parent: parent %ld died before %s started\n", ppid, argv[2]);
    return 125;
  }
  execvp(argv[2], argv + 2);
  fprintf(stderr, "die-with-parent: cannot run %s: %s\n", argv[2], strerror(errno));
  return 127;
}
