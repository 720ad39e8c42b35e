//! Logs go to stderr and, when `logFile` is set, appended to that file. Never stdout: stdout
//! belongs to the CNI result.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone)]
struct Tee {
    file: Option<Arc<Mutex<File>>>,
}

struct TeeWriter(Tee);

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        if let Some(f) = &self.0.file {
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Tee {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter(self.clone())
    }
}

pub fn init(level: tracing::Level, file: Option<&Path>) {
    let mut note = None;
    let file = file.and_then(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(Arc::new(Mutex::new(f))),
            Err(e) => {
                note = Some(format!(
                    "cannot open logFile {}: {e}; logging to stderr only",
                    p.display()
                ));
                None
            }
        }
    });
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .with_writer(Tee { file })
        .try_init();
    if let Some(n) = note {
        tracing::warn!("{n}");
    }
}
