/*
 * usbtest-run: issue the kernel usbtest driver's tests (drivers/usb/misc/usbtest.c)
 * on one USB device and print one line per test, for the usbwire kernel tests.
 *
 * Built at test time by usbwire_tests::kernel::usbtest (gcc -static) and copied
 * into the guest; never committed as a binary.
 *
 * It does what the kernel's tools/usb/testusb.c does (USBTEST_REQUEST through
 * USBDEVFS_IOCTL on the usbtest-bound interface) but finds the device by its
 * busid, takes the interface from the driver's sysfs bindings, and prints a
 * machine-readable line per test:
 *
 *   USBTEST <label> <test> <result> <seconds>
 *
 * where <result> is "ok", "n/a" (the driver answered EOPNOTSUPP: the test does
 * not apply to this device) or the errno's name and number, e.g. "EPIPE(32)".
 * <seconds> is the wall time of the ioctl.
 *
 * Exit status: 0 when no test failed, 1 when one did, 2 on a usage or setup error.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include <linux/usbdevice_fs.h>

#define TEST_CASES 30

/*
 * The layout usbtest.c (Linux 6.1) calls usbtest_param_64: what a 64-bit
 * program passes. Its size is part of the ioctl code, and the driver tells
 * this layout from the 32-bit one by that code.
 */
struct usbtest_param_64 {
	uint32_t test_num;
	uint32_t iterations;
	uint32_t length;
	uint32_t vary;
	uint32_t sglen;
	int64_t duration_sec;
	int64_t duration_usec;
};
#define USBTEST_REQUEST_64 _IOWR('U', 100, struct usbtest_param_64)

static const char *argv0 = "usbtest-run";

static void usage(void)
{
	fprintf(stderr,
		"usage: %s -b BUSID [-i IFNO] [-l LABEL] [-t TESTS] [-c ITERATIONS] [-s LENGTH]\n"
		"          [-v VARY] [-g SGLEN]\n"
		"  BUSID   the device's name in /sys/bus/usb/devices (e.g. 3-1)\n"
		"  IFNO    the interface (default: the lowest one bound to usbtest)\n"
		"  TESTS   e.g. 0-29 (the default) or 9,10\n"
		"  defaults as testusb: -c 1000 -s 512 -v 512 -g 32\n",
		argv0);
	exit(2);
}

static int parse_uint(const char *s, unsigned *out)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || end == s || *end || v > UINT_MAX)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* "0-29", "9,10", "2,4-6": sets wanted[i] for each test named. */
static int parse_tests(const char *spec, int wanted[TEST_CASES])
{
	char buf[256];
	char *tok, *save;

	if (strlen(spec) >= sizeof buf)
		return -1;
	strcpy(buf, spec);
	memset(wanted, 0, TEST_CASES * sizeof wanted[0]);
	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *dash = strchr(tok, '-');
		unsigned lo, hi, i;

		if (dash) {
			*dash = 0;
			if (parse_uint(tok, &lo) || parse_uint(dash + 1, &hi))
				return -1;
		} else {
			if (parse_uint(tok, &lo))
				return -1;
			hi = lo;
		}
		if (lo > hi || hi >= TEST_CASES)
			return -1;
		for (i = lo; i <= hi; i++)
			wanted[i] = 1;
	}
	return 0;
}

static int read_sysfs_uint(const char *path, int base, unsigned *out)
{
	char buf[32];
	FILE *f = fopen(path, "r");
	char *end;
	unsigned long v;

	if (!f)
		return -1;
	if (!fgets(buf, sizeof buf, f)) {
		fclose(f);
		return -1;
	}
	fclose(f);
	errno = 0;
	v = strtoul(buf, &end, base);
	if (errno || end == buf || v > UINT_MAX)
		return -1;
	*out = (unsigned)v;
	return 0;
}

/* The lowest interface number of BUSID that the usbtest driver is bound to. */
static int usbtest_interface(const char *busid, unsigned *ifno)
{
	const char *drv = "/sys/bus/usb/drivers/usbtest";
	DIR *d = opendir(drv);
	struct dirent *e;
	size_t n = strlen(busid);
	int found = 0;

	if (!d) {
		fprintf(stderr, "%s: %s: %s (is the usbtest module loaded?)\n", argv0, drv,
			strerror(errno));
		return -1;
	}
	while ((e = readdir(d))) {
		char path[PATH_MAX];
		unsigned num;

		/* interfaces are named BUSID:CONFIG.INTERFACE */
		if (strncmp(e->d_name, busid, n) || e->d_name[n] != ':')
			continue;
		snprintf(path, sizeof path, "%s/%s/bInterfaceNumber", drv, e->d_name);
		if (read_sysfs_uint(path, 16, &num))
			continue;
		if (!found || num < *ifno)
			*ifno = num;
		found = 1;
	}
	closedir(d);
	if (!found) {
		fprintf(stderr, "%s: no interface of %s is bound to usbtest\n", argv0, busid);
		return -1;
	}
	return 0;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	const char *busid = NULL, *label = NULL;
	unsigned ifno = 0, busnum, devnum;
	int have_ifno = 0, wanted[TEST_CASES], failed = 0, fd, c, i;
	struct usbtest_param_64 defaults = {
		.iterations = 1000, .length = 512, .vary = 512, .sglen = 32,
	};
	char path[PATH_MAX], node[64];

	argv0 = argv[0];
	for (i = 0; i < TEST_CASES; i++)
		wanted[i] = 1;
	while ((c = getopt(argc, argv, "b:i:l:t:c:s:v:g:")) != -1) {
		switch (c) {
		case 'b':
			busid = optarg;
			break;
		case 'i':
			if (parse_uint(optarg, &ifno))
				usage();
			have_ifno = 1;
			break;
		case 'l':
			label = optarg;
			break;
		case 't':
			if (parse_tests(optarg, wanted))
				usage();
			break;
		case 'c':
			if (parse_uint(optarg, &defaults.iterations))
				usage();
			break;
		case 's':
			if (parse_uint(optarg, &defaults.length))
				usage();
			break;
		case 'v':
			if (parse_uint(optarg, &defaults.vary))
				usage();
			break;
		case 'g':
			if (parse_uint(optarg, &defaults.sglen))
				usage();
			break;
		default:
			usage();
		}
	}
	if (!busid || optind != argc)
		usage();
	if (!label)
		label = busid;
	if (strchr(label, ' ') || strchr(busid, '/'))
		usage();

	snprintf(path, sizeof path, "/sys/bus/usb/devices/%s/busnum", busid);
	if (read_sysfs_uint(path, 10, &busnum)) {
		fprintf(stderr, "%s: %s: %s (no such USB device?)\n", argv0, path, strerror(errno));
		return 2;
	}
	snprintf(path, sizeof path, "/sys/bus/usb/devices/%s/devnum", busid);
	if (read_sysfs_uint(path, 10, &devnum)) {
		fprintf(stderr, "%s: %s: %s\n", argv0, path, strerror(errno));
		return 2;
	}
	if (!have_ifno && usbtest_interface(busid, &ifno))
		return 2;
	snprintf(node, sizeof node, "/dev/bus/usb/%03u/%03u", busnum, devnum);
	fd = open(node, O_RDWR);
	if (fd < 0) {
		fprintf(stderr, "%s: %s: %s\n", argv0, node, strerror(errno));
		return 2;
	}
	printf("USBTEST-DEVICE %s %s %s interface %u: -c %u -s %u -v %u -g %u\n", label, busid,
	       node, ifno, defaults.iterations, defaults.length, defaults.vary, defaults.sglen);
	fflush(stdout);

	for (i = 0; i < TEST_CASES; i++) {
		struct usbtest_param_64 param = defaults;
		struct usbdevfs_ioctl wrapper = {
			.ifno = (int)ifno,
			.ioctl_code = USBTEST_REQUEST_64,
			.data = &param,
		};
		double t0, secs;
		int rc, err;

		if (!wanted[i])
			continue;
		param.test_num = (uint32_t)i;
		t0 = now();
		rc = ioctl(fd, USBDEVFS_IOCTL, &wrapper);
		err = errno;
		secs = now() - t0;
		if (rc >= 0) {
			printf("USBTEST %s %d ok %.6f\n", label, i, secs);
		} else if (err == EOPNOTSUPP) {
			printf("USBTEST %s %d n/a %.6f\n", label, i, secs);
		} else {
			const char *name = strerrorname_np(err);

			printf("USBTEST %s %d %s(%d) %.6f\n", label, i, name ? name : "E?", err, secs);
			failed = 1;
		}
		fflush(stdout);
	}
	close(fd);
	return failed;
}
