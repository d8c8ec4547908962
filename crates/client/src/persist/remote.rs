//! Persistence for the userspace client: a [`PersistentDevice`] keeps a
//! [`RemoteDevice`] imported, importing it again whenever its connection
//! ends. While it is down, transfers fail at once with
//! [`PersistError::Reconnecting`] instead of waiting.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{
    supervise, Attach, AttemptError, Keepalive, PersistState, SuperviseOptions, CLIENT_KEEPALIVE,
    CONNECT_TIMEOUT, IMPORT_TIMEOUT,
};
use crate::error::{ClientError, TransferError};
use crate::remote::{import_stream, RemoteDevice};
use crate::transfer::{TransferOutcome, TransferRequest};
use crate::vhci::remote::client_message;

/// Why a [`PersistentDevice`] cannot serve a transfer now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The device is being imported again: retry after
    /// [`PersistentDevice::wait_attached`].
    #[error("the device is reconnecting ({state}); wait for it to be attached again")]
    Reconnecting { state: String },
    /// The supervisor was stopped.
    #[error("the persistent device was stopped")]
    Stopped,
    /// The transfer itself failed (the connection may have ended under it).
    #[error(transparent)]
    Transfer(#[from] TransferError),
}

/// Imports over plain TCP with keepalive, bounded in time.
struct UserspaceAttach {
    host: String,
    port: u16,
    busid: String,
    connect_timeout: Duration,
    import_timeout: Duration,
    keepalive: Keepalive,
    current: watch::Sender<Option<Arc<RemoteDevice>>>,
}

impl Attach for UserspaceAttach {
    type Imported = RemoteDevice;
    type Session = Arc<RemoteDevice>;

    async fn import(&mut self) -> Result<RemoteDevice, AttemptError> {
        let name = format!("{}:{}", self.host, self.port);
        let connect = tokio::net::TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(AttemptError::transient(client_message(
                    &ClientError::Connect { addr: name, source },
                )))
            }
            Err(_) => {
                return Err(AttemptError::transient(format!(
                    "cannot connect to {name}: no answer within {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        self.keepalive
            .apply(&stream)
            .map_err(|e| AttemptError::transient(format!("{name}: cannot set keepalive: {e}")))?;
        match tokio::time::timeout(
            self.import_timeout,
            import_stream(stream, &name, &self.busid),
        )
        .await
        {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(AttemptError {
                permanent: matches!(
                    e,
                    ClientError::ImportRefused {
                        status: usbwire_proto::OpStatus::NoDev,
                        ..
                    }
                ),
                message: client_message(&e),
            }),
            Err(_) => Err(AttemptError::transient(format!(
                "{name} did not answer the import of {} within {:?}",
                self.busid, self.import_timeout
            ))),
        }
    }

    async fn hand_over(
        &mut self,
        device: RemoteDevice,
    ) -> Result<(Arc<RemoteDevice>, Option<u32>), AttemptError> {
        let device = Arc::new(device);
        self.current.send_replace(Some(device.clone()));
        Ok((device, None))
    }

    async fn ended(&mut self, device: &mut Arc<RemoteDevice>) -> String {
        device.closed().await;
        self.current.send_replace(None);
        "the connection ended".into()
    }

    fn cleanup(&mut self, _device: Arc<RemoteDevice>) {
        self.current.send_replace(None);
    }
}

/// A remote device kept imported in user space.
pub struct PersistentDevice {
    current: watch::Receiver<Option<Arc<RemoteDevice>>>,
    states: watch::Receiver<PersistState>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl PersistentDevice {
    /// Starts importing `busid` from `host:port` and keeps it imported,
    /// with the default timeouts, keepalive and backoff. Must be called
    /// within a tokio runtime.
    pub fn start(host: &str, port: u16, busid: &str) -> PersistentDevice {
        Self::start_with(host, port, busid, SuperviseOptions::default(), |_| {})
    }

    /// [`PersistentDevice::start`] with other options, and `on_state`
    /// called with every state change, in order (where
    /// [`PersistentDevice::states`] may skip over quick ones).
    pub fn start_with(
        host: &str,
        port: u16,
        busid: &str,
        mut options: SuperviseOptions,
        mut on_state: impl FnMut(&PersistState) + Send + 'static,
    ) -> PersistentDevice {
        // A library user decides for itself what a refusal means.
        options.stop_on_permanent_first = false;
        let (current_tx, current) = watch::channel(None);
        let (states_tx, states) = watch::channel(PersistState::Connecting { attempt: 1 });
        let (stop, stop_rx) = watch::channel(false);
        let mut attach = UserspaceAttach {
            host: host.to_string(),
            port,
            busid: busid.to_string(),
            connect_timeout: CONNECT_TIMEOUT,
            import_timeout: IMPORT_TIMEOUT,
            keepalive: CLIENT_KEEPALIVE,
            current: current_tx,
        };
        let task = tokio::spawn(async move {
            supervise(&mut attach, options, stop_rx, |s| {
                on_state(s);
                states_tx.send_replace(s.clone());
            })
            .await;
            attach.current.send_replace(None);
        });
        PersistentDevice {
            current,
            states,
            stop,
            task: Some(task),
        }
    }

    /// The state now and every change after (a `watch`: a slow reader
    /// sees the latest).
    pub fn states(&self) -> watch::Receiver<PersistState> {
        self.states.clone()
    }

    /// The imported device, or why there is none now.
    pub fn device(&self) -> Result<Arc<RemoteDevice>, PersistError> {
        match &*self.current.borrow() {
            Some(d) if !d.is_closed() => Ok(d.clone()),
            _ => Err(self.down()),
        }
    }

    fn down(&self) -> PersistError {
        match &*self.states.borrow() {
            PersistState::Stopped => PersistError::Stopped,
            s => PersistError::Reconnecting {
                state: s.name().to_string(),
            },
        }
    }

    /// Waits until the device is imported (bounded by the caller), or the
    /// supervisor stopped.
    pub async fn wait_attached(&self) -> Result<Arc<RemoteDevice>, PersistError> {
        let mut current = self.current.clone();
        let mut states = self.states.clone();
        loop {
            if let Ok(d) = self.device() {
                return Ok(d);
            }
            if matches!(*states.borrow(), PersistState::Stopped) {
                return Err(PersistError::Stopped);
            }
            tokio::select! {
                r = current.changed() => if r.is_err() { return Err(PersistError::Stopped) },
                r = states.changed() => if r.is_err() { return Err(PersistError::Stopped) },
            }
        }
    }

    /// One transfer on the device as it is now: fails at once with
    /// [`PersistError::Reconnecting`] while it is being imported again.
    pub async fn transfer(&self, req: TransferRequest) -> Result<TransferOutcome, PersistError> {
        let device = self.device()?;
        Ok(device.submit(req).await)
    }

    /// Stops for good; the device is released (its connection closed)
    /// once every handle to it from [`PersistentDevice::device`] is gone.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for PersistentDevice {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
