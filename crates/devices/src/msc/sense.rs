//! Sense data: why the last command failed, for REQUEST SENSE.

/// Fixed-format sense data: the outcome of the last command, kept for
/// REQUEST SENSE because BOT's CSW can only say "failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sense {
    key: u8,
    asc: u8,
    ascq: u8,
    /// The INFORMATION field (the failing LBA for medium errors).
    info: Option<u64>,
}

impl Sense {
    pub(super) const NONE: Sense = Sense::new(0x00, 0x00, 0x00);
    pub(super) const NOT_PRESENT: Sense = Sense::new(0x02, 0x3a, 0x00);
    pub(super) const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    pub(super) const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    pub(super) const INVALID_FIELD: Sense = Sense::new(0x05, 0x24, 0x00);
    pub(super) const SAVING_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    pub(super) const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);

    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    pub(super) fn unrecovered_read(lba: u64) -> Sense {
        Sense {
            info: Some(lba),
            ..Sense::new(0x03, 0x11, 0x00)
        }
    }

    pub(super) fn write_error(lba: Option<u64>) -> Sense {
        Sense {
            info: lba,
            ..Sense::new(0x03, 0x0c, 0x00)
        }
    }

    /// 18 bytes of fixed-format sense (SPC-4 4.5.3). INFORMATION is four
    /// bytes wide, so an LBA beyond 2^32 is reported without the VALID bit
    /// rather than truncated into a wrong block number.
    pub(super) fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}
