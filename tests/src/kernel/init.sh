#!/bin/sh
# usbwire guest /init (busybox sh, PID 1). Generated into the cached base initramfs by
# usbwire_tests::kernel. Console (ttyS0) gets kernel + init messages; the test script's
# stdout/stderr go to ttyS1. Never exits: powers the VM off when the script is done.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp /var/run /var/log /var/tmp /root /mnt
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
modprobe configfs 2>/dev/null
mount -t configfs configfs /sys/kernel/config || echo "usbwire-init: configfs mount failed"

# Module autoloading for hotplugged devices (what udev does on a real system): the
# kernel has no uevent helper, so listen on netlink with busybox `uevent`.
if [ "${USBWIRE_AUTOLOAD:-1}" = 1 ]; then
	uevent /usr/sbin/usbwire-hotplug < /dev/null > /dev/null 2>&1 &
fi

# qemu-emulated USB hardware (Guest::xhci): USBWIRE_XHCI devices on a qemu-xhci
# controller. It was there at boot, before anything listened for uevents, so
# load its driver here, wait (bounded) until every device is configured, then
# load and bind the class drivers of their interfaces (modprobe binds the
# devices that exist when it loads a driver; ones the uevent listener loaded
# bind on their own).
if [ "${USBWIRE_XHCI:-0}" -gt 0 ]; then
	modprobe xhci_pci
	n=0; have=0
	while [ "$n" -lt 1200 ]; do
		have=0
		for d in /sys/bus/pci/drivers/xhci_hcd/*/usb*/[0-9]*-[0-9]*; do
			[ -n "$(cat "$d/bConfigurationValue" 2>/dev/null)" ] && have=$((have + 1))
		done
		[ "$have" -ge "$USBWIRE_XHCI" ] && break
		sleep 0.05; n=$((n + 1))
	done
	[ "$have" -ge "$USBWIRE_XHCI" ] || echo "usbwire-init: only $have of $USBWIRE_XHCI xHCI devices configured"
	if [ "${USBWIRE_AUTOLOAD:-1}" = 1 ]; then
		# only interfaces some module is for (others would never get a driver)
		wanted=
		for m in /sys/bus/pci/drivers/xhci_hcd/*/usb*/[0-9]*-[0-9]*/*:*/modalias; do
			[ -f "$m" ] && modprobe -q "$(cat "$m")" && wanted="$wanted ${m%/modalias}"
		done
		n=0
		while [ "$n" -lt 600 ]; do
			unbound=
			for i in $wanted; do
				[ -e "$i/driver" ] || unbound="$unbound ${i##*/}"
			done
			[ -z "$unbound" ] && break
			sleep 0.05; n=$((n + 1))
		done
		[ -z "$unbound" ] || echo "usbwire-init: xHCI interfaces without a driver:$unbound"
	fi
fi

OUT=/dev/ttyS1
[ -c "$OUT" ] || OUT=/dev/console
stty -F "$OUT" 115200 raw -echo 2>/dev/null

finish() {
	echo "USBWIRE-GUEST-EXIT $1" > "$OUT"
	echo "USBWIRE-GUEST-EXIT $1" > /dev/kmsg
	sync
	sleep 0.1
	poweroff -f
	sleep 2
	reboot -f
}

# Network: qemu user networking (slirp), virtio-net.
ip link set lo up
modprobe virtio_pci 2>/dev/null
modprobe virtio_net 2>/dev/null
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
if [ -e /sys/class/net/eth0 ]; then
	ip link set eth0 up
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
else
	echo "usbwire-init: no eth0"
fi
hostname usbwire-guest

echo "${USBWIRE_LOGLEVEL:-7}" > /proc/sys/kernel/printk
cd /root
if [ ! -f /usbwire/test.sh ]; then
	echo "usbwire-init: /usbwire/test.sh missing (was the per-test archive appended?)" > "$OUT"
	finish 127
fi
echo "USBWIRE-GUEST-START $(cut -d' ' -f1 /proc/uptime)" > "$OUT"
/bin/sh /usbwire/run.sh > "$OUT" 2>&1 < /dev/null
finish $?
