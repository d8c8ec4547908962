use std::fmt;
use std::str::FromStr;

/// The SHA-256 of a certificate's DER encoding: what pins a peer without a CA.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(certificate_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, certificate_der);
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }
}

/// `AB:CD:…`, the form `openssl x509 -fingerprint -sha256` prints.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A fingerprint that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a SHA-256 fingerprint: give 64 hex digits, colons allowed, as \
     `usbip cert fingerprint FILE` or `openssl x509 -noout -fingerprint -sha256 -in FILE` print it"
)]
pub struct FingerprintError(pub String);

/// 64 hex digits, either case, colons anywhere between them.
impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        let bad = || FingerprintError(s.to_string());
        let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_back_as_printed() {
        let f = Fingerprint::of(b"certificate");
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        let plain = f.to_string().replace(':', "").to_lowercase();
        assert_eq!(plain.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            "AB:CD".parse::<Fingerprint>(),
            Err(FingerprintError("AB:CD".into()))
        );
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
        // 64 digits, but one of them a multi-byte character's pieces.
        assert!(format!("é{}", "0".repeat(62))
            .parse::<Fingerprint>()
            .is_err());
    }

    #[test]
    fn the_digest_is_sha256_of_the_der() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            Fingerprint::of(b"abc").to_string(),
            "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:\
             B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
        );
    }
}
