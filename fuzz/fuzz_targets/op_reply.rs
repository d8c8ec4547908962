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

    let mut e1 = Vec::new();
    m1.encode(&mut e1);
    assert_eq!(e1.len(), n1, "re-encoded reply changed length");
    let m2 = match OpReply::decode(&e1, &lim) {
        Ok(Decoded::Message(m2, n2)) => {
            assert_eq!(n2, e1.len());
            m2
        }
        other => panic!("re-encoded {m1:?} decodes to {other:?}"),
    };
    assert_eq!(m2, common::normalize_reply(&m1));

    let mut e2 = Vec::new();
    m2.encode(&mut e2);
    assert_eq!(
        OpReply::decode(&e2, &lim),
        Ok(Decoded::Message(m2, e2.len()))
    );
});
