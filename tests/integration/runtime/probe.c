/* probe: try one privileged operation inside a VE and report. Exit 0 = the operation SUCCEEDED (bad for
 * a must-fail test), 1 = it failed (the errno is printed), 2 = usage. Static, so it runs in any VE. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int report(const char *what, long r)
{
	if (r < 0) {
		printf("%s: failed: %s\n", what, strerror(errno));
		return 1;
	}
	printf("%s: SUCCEEDED\n", what);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	const char *op = argv[1];
	if (!strcmp(op, "finit_module")) {
		int fd = open("/bin/true", O_RDONLY);
		return report(op, syscall(SYS_finit_module, fd, "", 0));
	}
	if (!strcmp(op, "init_module")) {
		static char image[4096] = "\177ELF";
		return report(op, syscall(SYS_init_module, image, sizeof image, ""));
	}
	if (!strcmp(op, "settimeofday")) {
		struct timeval tv = {1, 0};
		return report(op, settimeofday(&tv, 0));
	}
	if (!strcmp(op, "clock_settime")) {
		struct timespec ts = {1, 0};
		return report(op, clock_settime(CLOCK_REALTIME, &ts));
	}
	if (!strcmp(op, "syslog")) {
		char buf[4096];
		return report(op, klogctl(3, buf, sizeof buf));
	}
	if (!strcmp(op, "mknod_disk") && argc > 3) {
		unlink("/tmp/probe-disk");
		long r = mknod("/tmp/probe-disk", S_IFBLK | 0600, makedev(atoi(argv[2]), atoi(argv[3])));
		if (r < 0)
			return report("mknod", r);
		int fd = open("/tmp/probe-disk", O_RDONLY);
		if (fd < 0)
			return report("open disk node", fd);
		char buf[512];
		return report("read disk", read(fd, buf, sizeof buf));
	}
	if (!strcmp(op, "mount") && argc > 3) {
		return report(op, mount(argv[2], "/mnt", argv[3], 0, 0));
	}
	if (!strcmp(op, "open_by_handle_at")) {
		char buf[sizeof(struct file_handle) + 8] = {0};
		struct file_handle *h = (struct file_handle *)buf;
		h->handle_bytes = 8;
		h->handle_type = 1;
		return report(op, syscall(SYS_open_by_handle_at, AT_FDCWD, h, O_RDONLY));
	}
	return 2;
}
