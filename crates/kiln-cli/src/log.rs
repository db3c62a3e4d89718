//! Logging through `tracing` to standard error, sharing the terminal with a progress bar.
//!
//! `RUST_LOG` filters as usual (default `info`). On a terminal, training shows a progress bar; log lines are
//! printed above it by suspending the bar for each write. When standard error is not a terminal (piped to a
//! file, in CI), there is no bar and the lines are plain.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use tracing_subscriber::EnvFilter;

/// Where the progress bar, once started, lives: shared with the log writer.
#[derive(Clone, Default)]
pub struct ProgressSlot(Arc<Mutex<Option<ProgressBar>>>);

impl ProgressSlot {
    /// Shows a bar of `len` steps if standard error is a terminal; returns it for updates.
    pub fn start(&self, len: u64) -> Option<ProgressBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {elapsed_precise} elapsed, ~{eta} left")
                .expect("a valid template"),
        );
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
        Some(bar)
    }

    /// A byte-counting bar (with a message slot) if standard error is a terminal; its length is set by the caller
    /// when known.
    pub fn start_bytes(&self) -> Option<ProgressBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::no_length();
        bar.set_style(
            ProgressStyle::with_template("{bytes} read, {bytes_per_sec}, {msg}  {elapsed_precise}")
                .expect("a valid template"),
        );
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
        Some(bar)
    }

    pub fn finish(&self) {
        if let Some(bar) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

struct Writer(ProgressSlot);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let slot = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

pub fn init() -> ProgressSlot {
    let slot = ProgressSlot::default();
    let writer_slot = slot.clone();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_target(false)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(move || Writer(writer_slot.clone()))
        .init();
    slot
}
