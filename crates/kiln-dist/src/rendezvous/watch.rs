//! Liveness after a TCP rendezvous: its connections stay open, and a closed one means that process is gone.
//!
//! A process that ends, however it ends, has its sockets closed by the kernel, so the process at the other end
//! reads end-of-file. One thread per connection waits for that in a blocking read; these reads alone have no
//! timeout, since waiting is their whole purpose, and dropping the [`Watch`] shuts the connections down, which
//! ends them (and tells the other side). A process that finishes normally closes its connections in the same
//! way, so a loss means something only while the others are still needed, as during training. A machine that
//! vanishes without closing its sockets (power loss, a network partition) is not noticed here.

use kiln_core::{Error, Result};
use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Watches the job's other processes: rank 0 watches every other rank, the others watch rank 0. After a file
/// rendezvous there are no connections and a `Watch` never reports anything.
pub struct Watch {
    shared: Arc<Shared>,
    links: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    lost: Arc<AtomicBool>,
    message: Mutex<Option<String>>,
    /// Set while this side drops its own connections, which its threads then must not report.
    closing: AtomicBool,
}

// A watching thread only blocks in `read`; a small stack keeps rank 0's thousand of them cheap.
const THREAD_STACK_BYTES: usize = 64 * 1024;

impl Watch {
    pub(super) fn inert() -> Watch {
        Watch { shared: Arc::new(Shared::new()), links: Vec::new(), threads: Vec::new() }
    }

    /// Watches each connection; `who` names the process at its other end, as in "rank 2 (pid 4242 at
    /// 10.0.0.7:51234)".
    pub(super) fn over(links: Vec<(TcpStream, String)>) -> Result<Watch> {
        let mut watch = Watch::inert();
        let cannot = |e: std::io::Error| Error::backend("rendezvous", format!("cannot watch the other ranks: {e}"));
        for (link, who) in links {
            let reader = link.try_clone().map_err(cannot)?;
            reader.set_read_timeout(None).map_err(cannot)?;
            let shared = watch.shared.clone();
            let thread = std::thread::Builder::new()
                .name("kiln-watch".into())
                .stack_size(THREAD_STACK_BYTES)
                .spawn(move || shared.wait_for_end(reader, &who))
                .map_err(cannot)?;
            watch.links.push(link);
            watch.threads.push(thread);
        }
        Ok(watch)
    }

    /// Why the first process to go is gone, once one is.
    pub fn lost(&self) -> Option<String> {
        self.shared.message.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Set when a process is gone: cheap enough to poll every training step.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.shared.lost.clone()
    }
}

impl Shared {
    fn new() -> Shared {
        Shared { lost: Arc::new(AtomicBool::new(false)), message: Mutex::new(None), closing: AtomicBool::new(false) }
    }

    fn wait_for_end(&self, mut reader: TcpStream, who: &str) {
        let mut buf = [0u8; 64];
        let why = loop {
            match reader.read(&mut buf) {
                Ok(0) => break "closed its connection to the rendezvous: the process has ended".to_string(),
                // Nothing is sent after the rendezvous; whatever arrives is not an ending.
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("lost its connection to the rendezvous: {e}"),
            }
        };
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut message = self.message.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Reporting is left to whoever polls: a job that ends normally closes its connections too, and only the
        // process that still needed the others can tell a loss from an ending.
        if message.is_none() {
            *message = Some(format!("{who} {why}"));
            tracing::debug!("{who} {why}");
        }
        self.lost.store(true, Ordering::SeqCst);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        for link in &self.links {
            let _ = link.shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
