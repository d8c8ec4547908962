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
    // request. The busid is kept as the bytes that were sent, so it goes
    // out exactly as it came.
    let mut e1 = Vec::new();
    m1.encode(&mut e1);
    assert_eq!(e1.len(), n1, "re-encoded request changed length");
    assert_eq!(e1[..4], data[..4], "version or code changed");
    if let OpRequest::Import { .. } = &m1 {
        assert_eq!(e1[8..40], common::canonical_field(&data[8..40]));
    }
    assert_eq!(OpRequest::decode(&e1), Ok(Decoded::Message(m1, n1)));
});
