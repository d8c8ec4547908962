//! OpRequest::decode on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use usbwire_proto::{Decoded, OpRequest};

mod common;

fuzz_target!(|data: &[u8]| {
    let r = OpRequest::decode(data);
    common::check_decoded(data.len(), &r);
    let Ok(Decoded::Message(m1, n1)) = r else {
        return;
    };
    // Decoding depends only on the frame's own bytes.
    assert_eq!(
        OpRequest::decode(&data[..n1]),
        Ok(Decoded::Message(m1.clone(), n1))
    );

    // Re-encode: the frame has the same length and decodes to the same
    // request (strings as a C field would carry them).
    let mut e1 = Vec::new();
    m1.encode(&mut e1);
    assert_eq!(e1.len(), n1, "re-encoded request changed length");
    let m2 = match OpRequest::decode(&e1) {
        Ok(Decoded::Message(m2, n2)) => {
            assert_eq!(n2, e1.len());
            m2
        }
        other => panic!("re-encoded {m1:?} decodes to {other:?}"),
    };
    assert_eq!(m2, common::normalize_request(&m1));

    // One more trip changes nothing.
    let mut e2 = Vec::new();
    m2.encode(&mut e2);
    assert_eq!(OpRequest::decode(&e2), Ok(Decoded::Message(m2, e2.len())));
});
