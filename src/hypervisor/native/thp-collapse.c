/*
 * thp-collapse PID — asks the kernel to rebuild transparent huge pages in QEMU's guest RAM.
 *
 * Why: a background snapshot write-protects guest RAM with userfaultfd and QEMU releases the
 * protection one 4 KiB page at a time, which splits every huge page it touches. The kernel's own
 * khugepaged merges them back far too slowly (~16 MiB per 10 s), and with 4 KiB page tables
 * QEMU's next snapshot arms and releases protection page by page: its guest pause grows from a
 * few ms to ~100 ms for a 1 GiB guest (bench/take/RESULTS.md). process_madvise(MADV_COLLAPSE)
 * (Linux >= 6.1) collapses the range synchronously, in this process's time, while the guest runs.
 *
 * The guest RAM is taken to be the largest private read-write anonymous mapping of PID. Needs
 * ptrace rights over PID and CAP_SYS_NICE (root); prints "<bytes> ok" or an error, exit 0 / 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: thp-collapse PID\n");
    return 2;
  }
  int pid = atoi(argv[1]);
  char path[64], line[512];
  snprintf(path, sizeof path, "/proc/%d/maps", pid);
  FILE *f = fopen(path, "r");
  if (!f) {
    printf("cannot read %s: %s\n", path, strerror(errno));
    return 1;
  }
  unsigned long best_a = 0, best_b = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long a, b;
    char perms[8];
    int name_at = 0;
    if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &a, &b, perms, &name_at) < 3) continue;
    /* rw-p: under TCG the (larger) translated-code buffer is rwx, never the guest RAM */
    if (perms[0] != 'r' || perms[1] != 'w' || perms[2] != '-' || perms[3] != 'p') continue;
    if (name_at > 0 && line[name_at] != '\n' && line[name_at] != '\0') continue; /* named: not anonymous */
    if (b - a > best_b - best_a) best_a = a, best_b = b;
  }
  fclose(f);
  const unsigned long huge = 2UL << 20;
  unsigned long start = (best_a + huge - 1) & ~(huge - 1);
  if (best_b <= start + huge) {
    printf("no anonymous mapping large enough\n");
    return 1;
  }
  struct iovec iov = {(void *)start, (best_b - start) & ~(huge - 1)};
  int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
  if (pidfd < 0) {
    printf("pidfd_open: %s\n", strerror(errno));
    return 1;
  }
  long r = syscall(SYS_process_madvise, pidfd, &iov, 1, MADV_COLLAPSE, 0);
  if (r < 0) {
    printf("process_madvise(MADV_COLLAPSE): %s\n", strerror(errno));
    return 1;
  }
  printf("%zu ok\n", iov.iov_len);
  return 0;
}
