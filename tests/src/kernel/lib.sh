# usbwire guest shell library: sourced before every test script (/usbwire/lib.sh).
# All loops are bounded.

# usbwire_wait_path PATH [TIMEOUT_SECS=10]: wait until PATH exists.
usbwire_wait_path() {
	_n=0; _max=$(( ${2:-10} * 20 ))
	while [ ! -e "$1" ]; do
		_n=$((_n + 1))
		if [ "$_n" -gt "$_max" ]; then echo "usbwire: timeout waiting for $1" >&2; return 1; fi
		sleep 0.05
	done
}

# usbwire_wait_cmd TIMEOUT_SECS CMD...: retry CMD (every 0.1 s) until it succeeds.
usbwire_wait_cmd() {
	_n=0; _max=$(( $1 * 10 )); shift
	until "$@" >/dev/null 2>&1; do
		_n=$((_n + 1))
		if [ "$_n" -gt "$_max" ]; then echo "usbwire: timeout waiting for: $*" >&2; return 1; fi
		sleep 0.1
	done
}

# usbwire_task_states PID: the state letter (R, S, D, T, ...) of each thread of PID.
usbwire_task_states() {
	cat /proc/"$1"/task/*/stat 2>/dev/null | sed 's/.*) \(.\).*/\1/'
}

# usbwire_is_blocked PID: PID sleeps uninterruptibly (state D), as a reader
# waiting for its device's I/O does.
usbwire_is_blocked() {
	[ "$(sed 's/.*) \(.\).*/\1/' /proc/"$1"/stat 2>/dev/null)" = D ]
}

# usbwire_is_stopped PID: every thread of PID has stopped (SIGSTOP took effect),
# so it does nothing more until SIGCONT or SIGKILL.
usbwire_is_stopped() {
	_states=$(usbwire_task_states "$1")
	[ -n "$_states" ] && ! echo "$_states" | grep -qv T
}

# usbwire_wait_blocked PID [TIMEOUT_SECS=10] and usbwire_wait_stopped PID [TIMEOUT_SECS=10]:
# wait for the above.
usbwire_wait_blocked() { usbwire_wait_cmd "${2:-10}" usbwire_is_blocked "$1"; }
usbwire_wait_stopped() { usbwire_wait_cmd "${2:-10}" usbwire_is_stopped "$1"; }

# usbwire_wait_listen PORT [TIMEOUT_SECS=10]: wait until a TCP socket listens on PORT.
usbwire_wait_listen() {
	usbwire_wait_cmd "${2:-10}" sh -c "netstat -ltn | grep -q ':$1 '"
}

# usbwire_udc_busid [UDC=dummy_udc.0] [TIMEOUT_SECS=10]: print the busid (e.g. 17-1) of
# the device a gadget bound to the dummy UDC appears as on the matching dummy_hcd bus.
usbwire_udc_busid() {
	_udc=${1:-dummy_udc.0}
	_hcd=/sys/devices/platform/dummy_hcd.${_udc#dummy_udc.}
	usbwire_wait_cmd "${2:-10}" sh -c "ls -d $_hcd/usb*/*-1" || return 1
	_dev=$(ls -d "$_hcd"/usb*/*-1 | head -n 1)
	# wait for enumeration to finish (configuration selected)
	usbwire_wait_cmd "${2:-10}" sh -c "[ -n \"\$(cat $_dev/bConfigurationValue 2>/dev/null)\" ]" || return 1
	basename "$_dev"
}

# usbwire_wait_signal PORT [TIMEOUT_SECS=60]: block until the host connects to PORT
# (RunningGuest::signal); prints what the host sent.
usbwire_wait_signal() {
	echo ACK | timeout "${2:-60}" nc -l -p "$1"
}

# usbwire_xhci_busid PATTERN: print the busid (e.g. 3-1) of the device on the qemu-xhci
# controller (Guest::xhci) whose "idVendor:idProduct product" matches the grep -i
# PATTERN, e.g. "QEMU USB Keyboard" or "0403:6001". Fails when none matches.
usbwire_xhci_busid() {
	for _d in /sys/bus/pci/drivers/xhci_hcd/*/usb*/[0-9]*-[0-9]*; do
		[ -e "$_d/idVendor" ] || continue
		if echo "$(cat "$_d/idVendor"):$(cat "$_d/idProduct") $(cat "$_d/product" 2>/dev/null)" | grep -qi "$1"; then
			basename "$_d"
			return 0
		fi
	done
	echo "usbwire: no xHCI device matches $1" >&2
	return 1
}

# usbwire_xhci_devices: one line per device on the qemu-xhci controller:
# busid idVendor:idProduct speed(Mbit/s) driver-of-interface-0 product.
usbwire_xhci_devices() {
	for _d in /sys/bus/pci/drivers/xhci_hcd/*/usb*/[0-9]*-[0-9]*; do
		[ -e "$_d/idVendor" ] || continue
		_drv=$(basename "$(readlink "$_d/$(basename "$_d"):1.0/driver" 2>/dev/null)" 2>/dev/null)
		echo "$(basename "$_d") $(cat "$_d/idVendor"):$(cat "$_d/idProduct") $(cat "$_d/speed") ${_drv:-none} $(cat "$_d/product" 2>/dev/null)"
	done
}
