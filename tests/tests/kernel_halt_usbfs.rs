//! The endpoint error hold through the usbfs backend, on a real (dummy_hcd)
//! device in the guest: a Loopback gadget ends a transfer short, and the
//! data meant for the next stage still reaches the right URB.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use usbwire_client::{TransferError, TransferRequest};
use usbwire_proto::urb::flags::URB_SHORT_NOT_OK;
use usbwire_tests::kernel;
use usbwire_tests::support::bulk_endpoints;

const SIGNAL: u16 = 5555;
const FLOOR_MS: u64 = 300;

#[test]
fn short_read_through_usbfs_keeps_the_status_for_the_right_urb() {
    let Some(guest) = kernel::require() else {
        return;
    };
    let script = format!(
        r#"set -e
modprobe dummy_hcd
modprobe libcomposite
G=/sys/kernel/config/usb_gadget/lb
mkdir -p $G/strings/0x409 $G/configs/c.1/strings/0x409
echo 0x0525 > $G/idVendor
echo 0xa4a1 > $G/idProduct
echo usbwire-test > $G/strings/0x409/manufacturer
echo loopback > $G/strings/0x409/product
echo c1 > $G/configs/c.1/strings/0x409/configuration
mkdir $G/functions/Loopback.0
ln -s $G/functions/Loopback.0 $G/configs/c.1/
echo dummy_udc.0 > $G/UDC
busid=$(usbwire_udc_busid dummy_udc.0)
mkdir -p /etc/usbwire /var/lib/usbwire
printf '[server]\nhold_floor_ms = {floor}\n' > /etc/usbwire/usbipd.toml
usbipd-rs --config /etc/usbwire/usbipd.toml --state-file /var/lib/usbwire/b.json >/tmp/usbipd.log 2>&1 &
usbwire_wait_path /run/usbwire/usbipd.sock 20
usbwire_wait_listen 3240 20
usbip-rs bind -b $busid
echo "BUSID=$busid"
echo READY
usbwire_wait_signal {sig} 300
tail -n 40 /tmp/usbipd.log
"#,
        floor = FLOOR_MS,
        sig = SIGNAL
    );
    let g = guest
        .script(&script)
        .host_binary(&kernel::stripped_bin("usbipd"), "/usr/bin/usbipd-rs")
        .host_binary(&kernel::stripped_bin("usbip"), "/usr/bin/usbip-rs")
        .memory_mib(1024)
        .hostfwd(3240)
        .hostfwd(SIGNAL)
        .timeout(Duration::from_secs(300))
        .spawn()
        .expect("boot the guest");
    g.wait_for_output("READY", Duration::from_secs(200))
        .expect("guest ready");
    let busid = g
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("BUSID="))
        .expect("BUSID")
        .trim()
        .to_string();
    let addr = SocketAddr::from(([127, 0, 0, 1], g.host_port(3240)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let within = Duration::from_secs(20);
            let dev = usbwire_client::import(addr, &busid)
                .await
                .expect("import the loopback gadget");
            dev.set_configuration(1).await.expect("SET_CONFIGURATION");
            let (ep_in, ep_out) = bulk_endpoints(&dev.config_descriptor().await.unwrap());
            let data = vec![0xd7u8; 100];
            let status = b"USBS-status!!";

            // Unlink after the error: URB2 never runs, URB3 gets the status.
            dev.bulk_out(ep_out, &data).await.unwrap();
            dev.bulk_out(ep_out, status).await.unwrap();
            let mut urb1 =
                dev.submit(TransferRequest::bulk_in(ep_in, 512).with_flags(URB_SHORT_NOT_OK));
            let mut urb2 =
                dev.submit(TransferRequest::bulk_in(ep_in, 512).with_flags(URB_SHORT_NOT_OK));
            let urb3 = dev.submit(TransferRequest::bulk_in(ep_in, 512));
            let c1 = tokio::time::timeout(within, &mut urb1).await.expect("URB1");
            assert_eq!(
                c1.status,
                Err(TransferError::Short),
                "URB1 ends short with -EREMOTEIO"
            );
            assert_eq!(c1.data, data);
            urb2.cancel().await;
            let c2 = tokio::time::timeout(within, &mut urb2).await.expect("URB2");
            assert_eq!(
                c2.status,
                Err(TransferError::Cancelled),
                "URB2 must not have run"
            );
            let c3 = tokio::time::timeout(within, urb3).await.expect("URB3");
            assert_eq!(c3.status, Ok(()));
            assert_eq!(c3.data, status, "the status reached URB3 intact");

            // No unlink: URB2 runs after the grace window, in order.
            dev.bulk_out(ep_out, &data).await.unwrap();
            dev.bulk_out(ep_out, status).await.unwrap();
            // The window opens when the server sees URB1 end short, which is
            // after this instant however late anything runs: measured from
            // here, URB2 cannot come back sooner than the window (the slack
            // is for the guest's clock, not for load).
            let before_urb1 = Instant::now();
            let mut urb1 =
                dev.submit(TransferRequest::bulk_in(ep_in, 512).with_flags(URB_SHORT_NOT_OK));
            let urb2 = dev.submit(TransferRequest::bulk_in(ep_in, 512));
            assert_eq!(
                tokio::time::timeout(within, &mut urb1)
                    .await
                    .unwrap()
                    .status,
                Err(TransferError::Short)
            );
            let c2 = tokio::time::timeout(within, urb2)
                .await
                .expect("URB2 after the window");
            assert_eq!(c2.data, status);
            let urb2_after = before_urb1.elapsed();
            assert!(
                urb2_after >= Duration::from_millis(FLOOR_MS * 95 / 100),
                "URB2 ran {urb2_after:?} after URB1 was submitted, before the grace window ended",
            );
        })
    }));
    let signalled = g.signal(SIGNAL, "done", Duration::from_secs(30));
    let out = g.wait().expect("guest run");
    if result.is_err() {
        panic!(
            "the scenario failed (see above)\n--- guest ---\n{}\n--- console ---\n{}",
            out.output, out.console
        );
    }
    signalled.expect("signal the guest");
    out.assert_success();
}
