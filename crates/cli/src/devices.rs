//! Turning configured devices into exported ones.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use usbwire_devices::acm::{AcmBackend, AcmConfig, CdcAcm};
use usbwire_devices::hid::{self, HidKeyboard};
use usbwire_devices::msc::{MassStorage, MscConfig};
use usbwire_devices::testdev::{Pattern, TestDevice};
use usbwire_devices::{EmulatedBackend, EmulatedDevice};
use usbwire_server::{Backend, Registry};

use crate::config::{DeviceConfig, SerialBackend};

/// An exported device and what must live as long as it does.
pub struct Exported {
    pub busid: String,
    pub description: String,
    /// Background work feeding the device (a keyboard FIFO reader).
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Exported {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("device {index} ({busid}): cannot open disk image {path}: {source}")]
    Image {
        index: usize,
        busid: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("device {index} ({busid}): serial port: {source}")]
    Serial {
        index: usize,
        busid: String,
        source: std::io::Error,
    },
    #[error("device {index}: backend \"tcp\" needs listen = \"127.0.0.1:PORT\"")]
    SerialNeedsListen { index: usize },
    #[error("device {index}: {source}")]
    Registry {
        index: usize,
        source: usbwire_server::RegistryError,
    },
    #[error("cannot create the demo disk image: {0}")]
    DemoImage(std::io::Error),
}

/// The `--demo` set: a 64 MiB disk in a temporary file, a keyboard, a
/// serial echo port and the test device.
pub fn demo_set() -> Result<(Vec<DeviceConfig>, tempfile::TempPath), ExportError> {
    let file = tempfile::Builder::new()
        .prefix("usbwire-demo-")
        .suffix(".img")
        .tempfile()
        .map_err(ExportError::DemoImage)?;
    file.as_file()
        .set_len(64 * 1024 * 1024)
        .map_err(ExportError::DemoImage)?;
    let path = file.into_temp_path();
    let devices = vec![
        DeviceConfig::MassStorage {
            busid: None,
            name: None,
            labels: Vec::new(),
            image: path.to_path_buf(),
            read_only: false,
            product: Some("usbwire demo disk".into()),
            serial: None,
            bad_lbas: None,
        },
        DeviceConfig::Keyboard {
            busid: None,
            name: None,
            labels: Vec::new(),
            fifo: None,
            type_text: None,
        },
        DeviceConfig::Serial {
            busid: None,
            name: None,
            labels: Vec::new(),
            backend: SerialBackend::Echo,
            listen: None,
            link: None,
        },
        DeviceConfig::Test {
            busid: None,
            name: None,
            labels: Vec::new(),
            pattern: Pattern::default(),
        },
    ];
    Ok((devices, path))
}

/// Builds device `index` of the configuration and adds it to the registry.
/// Must run inside the tokio runtime (serial and keyboard feeders spawn tasks).
pub fn export(
    registry: &Registry,
    d: &DeviceConfig,
    index: usize,
) -> Result<Exported, ExportError> {
    let busid = d
        .busid()
        .map(str::to_string)
        .unwrap_or_else(|| format!("1-{}", index + 1));
    let reservation = registry
        .reserve(&busid)
        .map_err(|source| ExportError::Registry { index, source })?;
    let built = match d {
        DeviceConfig::MassStorage {
            image,
            read_only,
            product,
            serial,
            bad_lbas,
            ..
        } => mass_storage(
            image,
            *read_only,
            product.as_deref(),
            serial.as_deref(),
            *bad_lbas,
            index,
            &busid,
        )?,
        DeviceConfig::Keyboard {
            fifo, type_text, ..
        } => keyboard(fifo.as_deref(), type_text.as_deref(), &busid),
        DeviceConfig::Serial {
            backend,
            listen,
            link,
            ..
        } => serial(backend, *listen, link.as_deref(), index, &busid)?,
        DeviceConfig::Test { pattern, .. } => test_device(*pattern),
    };
    let busnum = busid
        .split('-')
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1);
    let backend = EmulatedBackend::new(built.device);
    let info = backend.device_info(&busid, busnum, index as u32 + 2);
    reservation.commit(info, Box::new(backend));
    Ok(Exported {
        busid,
        description: built.description,
        tasks: built.tasks,
    })
}

/// A device made from its configuration, not yet exported.
struct BuiltDevice {
    device: EmulatedDevice,
    description: String,
    /// Background work feeding the device.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BuiltDevice {
    fn new(device: EmulatedDevice, description: String) -> BuiltDevice {
        BuiltDevice {
            device,
            description,
            tasks: Vec::new(),
        }
    }
}

fn mass_storage(
    image: &Path,
    read_only: bool,
    product: Option<&str>,
    serial: Option<&str>,
    bad_lbas: Option<[u64; 2]>,
    index: usize,
    busid: &str,
) -> Result<BuiltDevice, ExportError> {
    let mut cfg = MscConfig {
        read_only,
        ..Default::default()
    };
    if let Some(p) = product {
        cfg.product = p.to_string();
    }
    if let Some(s) = serial {
        cfg.serial = s.to_string();
    }
    cfg.bad_lbas = bad_lbas.map(|[a, b]| a..b);
    let msc = MassStorage::open(image, cfg).map_err(|source| ExportError::Image {
        index,
        busid: busid.to_string(),
        path: image.to_path_buf(),
        source,
    })?;
    let desc = format!(
        "mass storage on {} ({} MiB{})",
        image.display(),
        msc.blocks() * 512 / (1024 * 1024),
        if read_only { ", read-only" } else { "" }
    );
    Ok(BuiltDevice::new(EmulatedDevice::new(msc), desc))
}

fn keyboard(fifo: Option<&Path>, type_text: Option<&str>, busid: &str) -> BuiltDevice {
    let (kbd, handle) = HidKeyboard::new();
    let mut desc = "HID keyboard".to_string();
    if let Some(t) = type_text {
        if let Err(e) = handle.type_text(t) {
            tracing::warn!("keyboard {busid}: cannot type the configured text: {e}");
        }
    }
    let mut tasks = Vec::new();
    if let Some(path) = fifo {
        desc = format!("HID keyboard typing lines written to {}", path.display());
        let path = path.to_path_buf();
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = hid::serve_fifo(&path, handle).await {
                tracing::error!("keyboard FIFO {}: {e}", path.display());
            }
        }));
    }
    BuiltDevice {
        tasks,
        ..BuiltDevice::new(EmulatedDevice::new(kbd), desc)
    }
}

fn serial(
    backend: &SerialBackend,
    listen: Option<SocketAddr>,
    link: Option<&Path>,
    index: usize,
    busid: &str,
) -> Result<BuiltDevice, ExportError> {
    let backend = match backend {
        SerialBackend::Echo => AcmBackend::Echo,
        SerialBackend::Pty => AcmBackend::Pty,
        SerialBackend::Tcp => {
            AcmBackend::Tcp(listen.ok_or(ExportError::SerialNeedsListen { index })?)
        }
    };
    let cfg = AcmConfig {
        backend: backend.clone(),
        pty_link: link.map(Path::to_path_buf),
        ..Default::default()
    };
    let acm = CdcAcm::new(cfg).map_err(|source| ExportError::Serial {
        index,
        busid: busid.to_string(),
        source,
    })?;
    let desc = match (&backend, acm.pty_path()) {
        (AcmBackend::Pty, Some(p)) => format!("CDC-ACM serial on PTY {}", p.display()),
        (AcmBackend::Tcp(a), _) => format!("CDC-ACM serial bridged to tcp://{a}"),
        _ => "CDC-ACM serial echo port".to_string(),
    };
    Ok(BuiltDevice::new(EmulatedDevice::new(acm), desc))
}

fn test_device(pattern: Pattern) -> BuiltDevice {
    BuiltDevice::new(
        EmulatedDevice::new(TestDevice::with_pattern(pattern)),
        format!(
            "test device (Gadget Zero source/sink, pattern {}; loopback)",
            pattern.attribute()
        ),
    )
}
