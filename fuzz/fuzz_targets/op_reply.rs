//! OpReply::decode on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbwire_proto::{Decoded, Limits, OpReply, OpStatus};

mod common;

fuzz_target!(|data: &[u8]| {
    // Small limits keep the fuzzer away from waiting on megabytes.
    let lim = Limits {
        max_devices: 64,
        ..Limits::default()
    };
    let r = OpReply::decode(data, &lim);
    common::check_decoded(data.len(), &r);
    let Ok(Decoded::Message(m1, n1)) = r else {
        return;
    };
    assert_eq!(
        OpReply::decode(&data[..n1], &lim),
        Ok(Decoded::Message(m1.clone(), n1))
    );
    match &m1 {
        OpReply::Devlist { devices, .. } => {
            assert!(devices.len() <= lim.max_devices as usize);
            for d in devices {
                assert_eq!(d.num_interfaces as usize, d.interfaces.len());
            }
        }
        OpReply::Import { status, device, .. } => {
            assert_eq!(device.is_some(), *status == OpStatus::Ok);
            if let Some(d) = device {
                assert!(d.interfaces.is_empty());
            }
        }
    }

    // Re-encode: same length, and the same reply when decoded again, with
    // busid and path exactly as they came.
    let mut e1 = Vec::new();
    m1.encode(&mut e1);
    assert_eq!(e1.len(), n1, "re-encoded reply changed length");
    assert_eq!(OpReply::decode(&e1, &lim), Ok(Decoded::Message(m1.clone(), n1)));
    // Device records start after the header (and a devlist's count); the
    // text fields lead each record.
    let mut at = match &m1 {
        OpReply::Devlist { .. } => 12,
        OpReply::Import { .. } => 8,
    };
    let devices = match &m1 {
        OpReply::Devlist { devices, .. } => devices.as_slice(),
        OpReply::Import { device, .. } => device.as_slice(),
    };
    for d in devices {
        let (path, busid) = (at..at + 256, at + 256..at + 288);
        assert_eq!(e1[path.clone()], common::canonical_field(&data[path]));
        assert_eq!(e1[busid.clone()], common::canonical_field(&data[busid]));
        at += 312 + 4 * d.interfaces.len();
    }
});
