//! `cargo bench -p podwire-agent --bench lookup`: how fast the agent answers the plugin.
//!
//! Starts the real `podwire-agent serve` (release build) with 110 pods (a full node), then
//! asks it the way podwire-cni does (one connection, one JSON line each way) from a fresh
//! connection per look-up: sequentially, and from 8 threads at once. Reports p50/p90/p99 and
//! the agent's resident memory. Reported, not asserted.

use podwire_lab::lab::pod_manifest;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ask(socket: &Path, name: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut s = UnixStream::connect(socket)?;
    writeln!(s, r#"{{"v":1,"namespace":"default","name":"{name}"}}"#)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let took = start.elapsed();
    anyhow::ensure!(
        line.contains("\"found\""),
        "unexpected answer for {name}: {line}"
    );
    Ok(took)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn row(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "| {label} | {} | {:.0} | {:.0} | {:.0} |",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99)
    )
}

fn main() -> anyhow::Result<()> {
    let bin = std::env::var("PODWIRE_AGENT_BIN")
        .unwrap_or_else(|_| "target/release/podwire-agent".into());
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(bin);
    anyhow::ensure!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        bin.display()
    );
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let pods: Vec<String> = (0..110)
        .map(|i| pod_manifest("default", &format!("p{i}"), true, &[]).to_string())
        .collect();
    std::fs::create_dir_all(dir.path().join("pods"))?;
    std::fs::write(dir.path().join("pods/node.yaml"), pods.join("\n---\n"))?;
    let socket = dir.path().join("agent.sock");
    let agent = Agent(
        Command::new(&bin)
            .args(["--log-level", "warn", "serve", "--pods-dir"])
            .arg(dir.path().join("pods"))
            .arg("--socket")
            .arg(&socket)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&socket, "p109").is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not serve p109 within 10s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..200 {
        ask(&socket, &format!("p{}", i % 110))?;
    }
    let sequential: Vec<Duration> = (0..iters)
        .map(|i| ask(&socket, &format!("p{}", i % 110)))
        .collect::<Result<_, _>>()?;
    let concurrent: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let socket = &socket;
                s.spawn(move || {
                    (0..iters / 8)
                        .map(|i| ask(socket, &format!("p{}", (i * 8 + t) % 110)))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
            .collect::<Result<Vec<_>, _>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.0.id()))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap_or("VmRSS: ?")
        .split_whitespace()
        .nth(1)
        .unwrap_or("?")
        .to_string();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "podwire-agent serve, 110 pods, fresh connection per look-up, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("\n| look-ups | n | p50 µs | p90 µs | p99 µs |\n|---|---:|---:|---:|---:|");
    println!("{}", row("sequential", sequential));
    println!("{}", row("8 clients at once", concurrent));
    println!("\nagent resident memory after the run: {rss} kB");
    Ok(())
}
