//! Connections run on a fixed set of worker threads, each with a
//! single-threaded runtime of its own, and stay on the thread they were
//! given.
//!
//! Why not tokio's work-stealing runtime: a session is one task that does
//! all of its connection's work, so there is nothing to balance inside a
//! connection, and stealing only costs. Measured with `usbwire-bench`
//! pinned to one CPU, the multi-threaded runtime added about 1 µs and
//! 1.2 µs of CPU to every control round trip (worker wake-ups, cross-thread
//! queues, a task that moves between cores and takes its cache misses
//! along). Connections are spread over the threads by how many each
//! already serves, so concurrent imports land on different cores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::{error, info};

use crate::{session, ServerState};

/// One accepted connection on its way to a worker.
pub(crate) struct Job {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub conn: u64,
    pub permit: OwnedSemaphorePermit,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections this worker serves now.
    load: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

pub(crate) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `n` worker threads. A thread that cannot start (out of
    /// threads, say) is logged and skipped; if none starts, connections
    /// are served on the caller's runtime instead.
    pub fn start(n: usize, state: &Arc<ServerState>, stop: &watch::Receiver<bool>) -> Workers {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let load = Arc::new(AtomicUsize::new(0));
            let (done_tx, done_rx) = oneshot::channel();
            let (state, stop, load2) = (state.clone(), stop.clone(), load.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("usbipd-worker-{i}"))
                .spawn(move || worker_main(rx, state, stop, load2, done_tx));
            match spawned {
                Ok(_) => workers.push(Worker {
                    jobs: tx,
                    load,
                    done: done_rx,
                }),
                Err(e) => error!("cannot start worker thread {i}: {e}"),
            }
        }
        Workers { workers }
    }

    /// Hands a connection to the least busy worker. Gives it back if there
    /// is no worker to take it.
    pub fn dispatch(&self, job: Job) -> Result<(), Job> {
        let Some(w) = self
            .workers
            .iter()
            .filter(|w| !w.jobs.is_closed())
            .min_by_key(|w| w.load.load(Ordering::Relaxed))
        else {
            return Err(job);
        };
        w.load.fetch_add(1, Ordering::Relaxed);
        w.jobs.send(job).map_err(|e| {
            w.load.fetch_sub(1, Ordering::Relaxed);
            e.0
        })
    }

    /// Waits until every worker has finished its connections (they end on
    /// the stop signal) and exited.
    pub async fn join(self) {
        let mut dones = Vec::with_capacity(self.workers.len());
        for w in self.workers {
            // No more jobs: the worker's loop ends once its sessions have.
            drop(w.jobs);
            dones.push(w.done);
        }
        for d in dones {
            let _ = d.await;
        }
    }
}

fn worker_main(
    mut jobs: mpsc::UnboundedReceiver<Job>,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
    load: Arc<AtomicUsize>,
    done: oneshot::Sender<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // Dropping `jobs` closes the channel: dispatch skips this worker.
            error!("cannot start a worker runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => {
                        sessions.spawn(serve(job, state.clone(), stop.clone(), load.clone()));
                    }
                    None => break,
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        while sessions.join_next().await.is_some() {}
    });
    let _ = done.send(());
}

/// Serves one connection on the current runtime.
pub(crate) async fn serve(
    job: Job,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
    load: Arc<AtomicUsize>,
) {
    let Job {
        stream,
        peer,
        conn,
        permit,
    } = job;
    match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => {
            if let Err(e) = session::driver::serve(stream, state, conn, stop).await {
                info!(conn, %peer, "connection ended: {e}");
            }
        }
        Err(e) => error!(conn, %peer, "cannot register the connection: {e}"),
    }
    load.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Registry, ServerConfig};
    use std::time::{Duration, Instant};
    use tokio::sync::Semaphore;

    fn load_of(w: &Workers) -> Vec<usize> {
        w.workers
            .iter()
            .map(|w| w.load.load(Ordering::Relaxed))
            .collect()
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_end_on_stop() {
        let state = Arc::new(ServerState::new(Registry::new(), ServerConfig::default()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let workers = Workers::start(2, &state, &stop_rx);
        assert_eq!(workers.workers.len(), 2);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let permits = Arc::new(Semaphore::new(8));
        // Clients that never send their OP request keep their sessions busy.
        let mut clients = Vec::new();
        for conn in 0..3u64 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (stream, peer) = listener.accept().unwrap();
            stream.set_nonblocking(true).unwrap();
            let permit = permits.clone().try_acquire_owned().unwrap();
            let job = Job {
                stream,
                peer,
                conn,
                permit,
            };
            assert!(workers.dispatch(job).is_ok());
        }
        let mut loads = load_of(&workers);
        loads.sort();
        assert_eq!(loads, vec![1, 2], "three connections over two workers");
        stop_tx.send(true).unwrap();
        let joined = tokio::time::timeout(Duration::from_secs(10), async {
            let start = Instant::now();
            // Sessions end on the stop signal and give their permits back.
            while permits.available_permits() < 8 && start.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            workers.join().await;
        })
        .await;
        assert!(joined.is_ok(), "workers did not end after stop");
        assert_eq!(permits.available_permits(), 8);
    }
}
