/*
 * data-extents FILE — prints the ranges of FILE that hold data, one "offset length" line each
 * (decimal bytes, ascending, non-overlapping), then "end SIZE". Everything else is a hole.
 *
 * Why: importing a sparse VM image should not read its holes. Reading a hole is not free: the
 * kernel zero-fills page cache for it, which measured as the largest single cost of importing a
 * sparse 2 GiB image (docs/benchmarks.md). Node has no lseek, so SEEK_DATA/SEEK_HOLE live here.
 * A file system without SEEK_DATA support answers with the whole file as data (the kernel's
 * generic implementation), which is correct, just not faster. Exit 0, or 1 with a message.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: data-extents FILE\n");
    return 1;
  }
  int fd = open(argv[1], O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    fprintf(stderr, "data-extents: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  off_t size = lseek(fd, 0, SEEK_END);
  if (size < 0) {
    fprintf(stderr, "data-extents: %s: %s\n", argv[1], strerror(errno));
    return 1;
  }
  off_t pos = 0;
  while (pos < size) {
    off_t data = lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break; /* only a hole from pos to the end */
      fprintf(stderr, "data-extents: %s: SEEK_DATA: %s\n", argv[1], strerror(errno));
      return 1;
    }
    if (data >= size) break;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      fprintf(stderr, "data-extents: %s: SEEK_HOLE: %s\n", argv[1], strerror(errno));
      return 1;
    }
    if (hole > size) hole = size;
    printf("%lld %lld\n", (long long)data, (long long)(hole - data));
    pos = hole;
  }
  printf("end %lld\n", (long long)size);
  return fflush(stdout) == 0 ? 0 : 1;
}
