//! The emulated disk over real TCP, driven with raw Bulk-Only Transport and
//! SCSI by the project's client library, across a daemon restart.

mod common;

use common::*;
use rand::RngCore;
use usbwire_client::{RemoteDevice, TransferError};

const BULK_IN: u8 = 0x81;
const BULK_OUT: u8 = 0x02;

struct Csw {
    tag: u32,
    residue: u32,
    status: u8,
}

/// One SCSI command through BOT: CBW, data phase, CSW. Stalls are cleared
/// the way usb-storage does.
async fn scsi(
    dev: &RemoteDevice,
    tag: u32,
    cdb: &[u8],
    data_in: u32,
    data_out: &[u8],
) -> (Vec<u8>, Csw) {
    let mut cbw = Vec::with_capacity(31);
    cbw.extend_from_slice(&0x4342_5355u32.to_le_bytes());
    cbw.extend_from_slice(&tag.to_le_bytes());
    let len = if data_out.is_empty() {
        data_in
    } else {
        data_out.len() as u32
    };
    cbw.extend_from_slice(&len.to_le_bytes());
    cbw.push(if data_out.is_empty() && data_in > 0 {
        0x80
    } else {
        0
    });
    cbw.push(0);
    cbw.push(cdb.len() as u8);
    let mut cb = [0u8; 16];
    cb[..cdb.len()].copy_from_slice(cdb);
    cbw.extend_from_slice(&cb);
    assert_eq!(dev.bulk_out(BULK_OUT, &cbw).await.expect("CBW"), 31);
    let mut data = Vec::new();
    if data_in > 0 {
        match dev.bulk_in(BULK_IN, data_in).await {
            Ok(d) => data = d,
            Err(TransferError::Stall) => dev.clear_halt(BULK_IN).await.expect("clear halt"),
            Err(e) => panic!("data phase: {e}"),
        }
    } else if !data_out.is_empty() {
        match dev.bulk_out(BULK_OUT, data_out).await {
            Ok(_) => {}
            Err(TransferError::Stall) => dev.clear_halt(BULK_OUT).await.expect("clear halt"),
            Err(e) => panic!("data phase: {e}"),
        }
    }
    let raw = match dev.bulk_in(BULK_IN, 13).await {
        Ok(c) => c,
        Err(TransferError::Stall) => {
            dev.clear_halt(BULK_IN).await.unwrap();
            dev.bulk_in(BULK_IN, 13)
                .await
                .expect("CSW after clearing the halt")
        }
        Err(e) => panic!("CSW: {e}"),
    };
    assert_eq!(raw.len(), 13, "CSW length");
    assert_eq!(&raw[..4], &0x5342_5355u32.to_le_bytes(), "CSW signature");
    let csw = Csw {
        tag: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
        residue: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
        status: raw[12],
    };
    assert_eq!(csw.tag, tag, "CSW tag");
    (data, csw)
}

fn rw10(op: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

async fn import_disk(addr: std::net::SocketAddr) -> RemoteDevice {
    let dev = usbwire_client::import(addr, "1-1")
        .await
        .expect("import the disk");
    dev.set_configuration(1).await.expect("SET_CONFIGURATION");
    dev
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_compare_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 * 1024 * 1024)
        .unwrap();
    let config = dir.path().join("usbipd.toml");
    std::fs::write(
        &config,
        "[[device]]\nkind = \"mass-storage\"\nimage = \"disk.img\"\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();

    let mut payload = vec![0u8; 64 * 1024];
    rand::thread_rng().fill_bytes(&mut payload);
    let lba = 1000u32;
    {
        let d = Daemon::start(&["--config", cfg], dir.path());
        let dev = import_disk(d.addr()).await;
        // INQUIRY: a direct-access device that says who it is.
        let (inq, csw) = scsi(&dev, 1, &[0x12, 0, 0, 0, 36, 0], 36, &[]).await;
        assert_eq!(csw.status, 0);
        assert_eq!(inq.len(), 36);
        assert_eq!(inq[0] & 0x1f, 0, "peripheral device type: direct access");
        assert_eq!(&inq[8..16], b"usbwire ");
        // READ CAPACITY(10): last LBA and block size.
        let (cap, csw) = scsi(&dev, 2, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8, &[]).await;
        assert_eq!(csw.status, 0);
        assert_eq!(
            u32::from_be_bytes(cap[0..4].try_into().unwrap()),
            8 * 2048 - 1
        );
        assert_eq!(u32::from_be_bytes(cap[4..8].try_into().unwrap()), 512);
        // WRITE(10) then READ(10): the same bytes.
        let (_, csw) = scsi(&dev, 3, &rw10(0x2a, lba, 128), 0, &payload).await;
        assert_eq!((csw.status, csw.residue), (0, 0));
        let (back, csw) = scsi(&dev, 4, &rw10(0x28, lba, 128), 64 * 1024, &[]).await;
        assert_eq!(csw.status, 0);
        assert!(
            back == payload,
            "READ(10) returned different data than WRITE(10) wrote"
        );
        // A READ beyond capacity: CHECK CONDITION, and the sense says why.
        let (_, csw) = scsi(&dev, 5, &rw10(0x28, 8 * 2048, 1), 512, &[]).await;
        assert_eq!(
            csw.status, 1,
            "READ beyond capacity must fail with CHECK CONDITION"
        );
        let (sense, csw) = scsi(&dev, 6, &[0x03, 0, 0, 0, 18, 0], 18, &[]).await;
        assert_eq!(csw.status, 0);
        assert_eq!(sense[2] & 0x0f, 0x05, "sense key ILLEGAL REQUEST");
        assert_eq!(sense[12], 0x21, "ASC: LOGICAL BLOCK ADDRESS OUT OF RANGE");
        drop(dev);
        assert!(d.stop().success(), "usbipd must exit cleanly on SIGTERM");
    }
    // The data is in the image itself...
    let bytes = std::fs::read(&image).unwrap();
    let at = lba as usize * 512;
    assert!(
        bytes[at..at + payload.len()] == payload[..],
        "the image does not hold the written data"
    );
    // ...and a restarted daemon serves it.
    let d = Daemon::start(&["--config", cfg], dir.path());
    let dev = import_disk(d.addr()).await;
    let (back, csw) = scsi(&dev, 7, &rw10(0x28, lba, 128), 64 * 1024, &[]).await;
    assert_eq!(csw.status, 0);
    assert!(back == payload, "data read after the restart differs");
}
