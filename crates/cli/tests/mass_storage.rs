//! The emulated disk over real TCP, driven with raw Bulk-Only Transport and
//! SCSI by the project's client library, across a daemon restart.

mod common;

use common::scsi::{rw10, scsi};
use common::*;
use rand::RngCore;
use usbwire_client::RemoteDevice;

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
