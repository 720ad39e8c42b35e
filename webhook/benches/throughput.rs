//! `cargo bench -p podwire-injector --bench throughput`: the injector (the release binary,
//! `serve` with certificate files) against a bare HTTPS server on the same stack (hyper 1 +
//! tokio-rustls, same certificate) that only parses the AdmissionReview and answers
//! "allowed"; same client (ureq + rustls, keep-alive), same run.
//!
//! Two workloads, each request with its own uid: "distinct pods" (no two pod objects alike:
//! every request is rendered) and "replicas" (one pod template, as a Deployment's replicas
//! arrive: answered from the injector's memo after the first).
//! A third server, the "ceiling", is the bare server answering every request with the
//! injector's own answer for the fixture (same patch bytes, the request's uid): what an
//! injector that spent no time at all deciding and rendering would reach, so the run shows how
//! much of the gap is the work and how much is carrying Istio's sidecar (TLS, the kernel, the
//! client on a ~7 KB answer).
//! Reports: throughput of the servers and the ratio per workload (target >= 0.8), p50/p99 at
//! a fixed request rate (distinct pods), and the injector's peak resident memory under load
//! (target <= 30 MiB).
//! Knobs (env): BENCH_SECONDS (default 5), BENCH_CLIENTS (default 8), BENCH_RATE (default 500/s).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use podwire_injector::certs::{issue, new_ca, Policy};
use podwire_injector::AdmissionReview;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BARE_ENV: &str = "PODWIRE_BENCH_BARE_SERVER";

// The bare server gets the injector's allocator: the comparison is about the work, not malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Ok(args) = std::env::var(BARE_ENV) {
        bare_server(&args);
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = env_or("BENCH_SECONDS", 5);
    let clients: usize = env_or("BENCH_CLIENTS", 8);
    let rate: u64 = env_or("BENCH_RATE", 500);
    let dir = tempfile::tempdir().expect("tmp");
    let ca = write_cert(dir.path());
    let body = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/controller-pod.json"),
    )
    .expect("fixture");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config.yaml");

    // The work the injector adds per request, in process (no TLS, no HTTP).
    let cfg = podwire_injector::load_config(&config, &podwire_core::MeshProfile::istio())
        .expect("config")
        .config;
    let profile = podwire_core::MeshProfile::istio();
    let (n, t) = (20_000u32, Instant::now());
    for _ in 0..n {
        let r = podwire_injector::review_resolving(&body, &cfg, &|_| None, &profile);
        std::hint::black_box(r.review.to_json().expect("json"));
    }
    let review_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let t = Instant::now();
    for _ in 0..n {
        let r: AdmissionReview = serde_json::from_slice(&body).expect("parse");
        std::hint::black_box(r);
    }
    let parse_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("in process: review + encode {review_us:.1} us/request; parse only (the bare server's work) {parse_us:.1} us");
    let (review_cold, parse_cold) = cold_caches(&body, &cfg, &profile);
    println!(
        "in process, caches cold (8 MiB written between requests, as the client's and the kernel's \
         work evicts them under load): review + encode {review_cold:.1} us; parse only {parse_cold:.1} us"
    );
    // The answer's size: the JSON patch (Istio's full sidecar, native layout) and the whole
    // AdmissionReview on the wire.
    let answer = podwire_injector::review_resolving(&body, &cfg, &|_| None, &profile);
    let wire = answer.review.to_json().expect("json");
    let patch = answer
        .review
        .response
        .as_ref()
        .and_then(|r| r.patch.as_ref())
        .map(|p| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(p)
                .map(|b| b.len())
                .unwrap_or(0)
        })
        .unwrap_or(0);
    println!(
        "answer: JSON patch {patch} bytes, AdmissionReview response {} bytes (request {} bytes)",
        wire.len(),
        body.len()
    );
    let canned = dir.path().join("answer.json");
    std::fs::write(
        &canned,
        serde_json::to_vec(answer.review.response.as_ref().expect("a response")).expect("JSON"),
    )
    .expect("write");

    // Each server binds port 0 itself and says where it listens (no pick-then-bind race).
    let bare_like = |canned: Option<&Path>| {
        let mut args = format!(
            "127.0.0.1:0 {} {}",
            dir.path().join("tls.crt").display(),
            dir.path().join("tls.key").display()
        );
        if let Some(c) = canned {
            args.push_str(&format!(" {}", c.display()));
        }
        start(
            Command::new(std::env::current_exe().expect("self")).env(BARE_ENV, args),
            BARE_LISTENING,
            Box::new(std::io::sink()),
        )
    };
    let (bare, bare_addr) = bare_like(None);
    let (ceiling, ceiling_addr) = bare_like(Some(&canned));
    let (inj, inj_addr) = start(
        Command::new(env!("CARGO_BIN_EXE_podwire-injector"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--no-namespace-watch"])
            .arg("--no-istio-config")
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .stderr(Stdio::inherit()),
        INJECTOR_LISTENING,
        Box::new(std::io::stdout()),
    );
    let agent = client(&ca);
    for addr in [bare_addr, inj_addr, ceiling_addr] {
        wait_up(&agent, addr, &body);
    }
    println!(
        "webhook throughput: {clients} keep-alive clients, {secs}s per run, body {} bytes (controller-pod.json)",
        body.len()
    );
    // Each round starts with another server; its ratios compare neighbours in time (the
    // machine may be shared), and the median round is reported.
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let mut peak_rss = 0u64;
    let distinct = Bodies::new(&body, true);
    for bodies in [distinct.clone(), Bodies::new(&body, false)] {
        let (mut ratios, mut ceilings) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut rps = [0f64; 3];
            // Each round starts with a different server.
            for k in 0..3 {
                let i = (round + k) % 3;
                let (name, addr, pid) = match i {
                    0 => ("bare", bare_addr, bare.0.id()),
                    1 => ("injector", inj_addr, inj.0.id()),
                    _ => ("ceiling", ceiling_addr, ceiling.0.id()),
                };
                let run = throughput(&ca, addr, &bodies, clients, secs, pid);
                if i == 1 {
                    peak_rss = peak_rss.max(run.rss);
                }
                rps[i] = run.rps;
                println!(
                    "  {:13} round {round}: {name:9} {:9.0} req/s, CPU per request: server {:5.1} us, clients {:5.1} us",
                    bodies.name(),
                    run.rps,
                    run.server_us,
                    run.client_us
                );
            }
            ratios.push(rps[1] / rps[0]);
            ceilings.push(rps[2] / rps[0]);
        }
        let median = |v: &[f64]| {
            let mut sorted = v.to_vec();
            sorted.sort_by(f64::total_cmp);
            sorted[sorted.len() / 2]
        };
        let shown = |v: &[f64]| v.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>();
        let ratio = median(&ratios);
        println!(
            "throughput ratio injector/bare, {}: median {ratio:.2} over rounds {:?} (target >= 0.80: {})",
            bodies.name(),
            shown(&ratios),
            if ratio >= 0.8 { "met" } else { "NOT met" }
        );
        println!(
            "  ceiling/bare (the injector's answer sent with no work): median {:.2} over rounds {:?}",
            median(&ceilings),
            shown(&ceilings)
        );
    }
    for (name, addr) in [
        ("bare", bare_addr),
        ("ceiling", ceiling_addr),
        ("injector", inj_addr),
    ] {
        let pid = (name == "injector").then(|| inj.0.id());
        let (p50, p99, n, rss) = fixed_rate(&ca, addr, &distinct, rate, secs, pid);
        peak_rss = peak_rss.max(rss);
        println!(
            "latency at {rate} req/s, distinct pods: {name:9} p50 {:7.1} us  p99 {:7.1} us  ({n} requests)",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    let mib = peak_rss as f64 / 1024.0;
    println!(
        "injector peak resident memory under load: {mib:.1} MiB (target <= 30 MiB: {})",
        if mib <= 30.0 { "met" } else { "NOT met" }
    );
    drop((bare, ceiling));
}

/// The review and the bare parse timed one request at a time, each after writing a buffer
/// several times this machine's L2 (2 MiB per core here): under load, the client's TLS and
/// the kernel run between two requests on the same core and evict the code and data a
/// request needs. A distinct pod's review touches far more code than the parse (callgrind's
/// cache simulation counts ~3k lines of code fetched from beyond L2 per review), so it pays
/// for the eviction much more: this is why the server's CPU per request under load is a
/// multiple of the hot-loop figure.
fn cold_caches(
    body: &[u8],
    cfg: &podwire_core::inject::InjectorConfig,
    profile: &podwire_core::MeshProfile,
) -> (f64, f64) {
    let mut junk = vec![0u8; 8 << 20];
    let mut evict = |round: u64| {
        for b in junk.iter_mut().step_by(64) {
            *b = b.wrapping_add(round as u8);
        }
        std::hint::black_box(&junk);
    };
    let bodies = Bodies::new(body, true);
    let (n, mut review, mut parse) = (2_000u64, Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let b = bodies.body(0, i);
        evict(i);
        let t = Instant::now();
        let r = podwire_injector::review_resolving(&b, cfg, &|_| None, profile);
        std::hint::black_box(r.review.to_json().expect("json"));
        review += t.elapsed();
        evict(i);
        let t = Instant::now();
        std::hint::black_box(serde_json::from_slice::<AdmissionReview>(&b).expect("parse"));
        parse += t.elapsed();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    (us(review), us(parse))
}

/// What the clients send: the fixture with a fresh uid on every request (as the API server
/// sends), and for `distinct` pods also a label value of its own, so that no two pod objects
/// are alike and the injector renders every one (no answer from its memo of replicas).
#[derive(Clone)]
struct Bodies {
    template: String,
    distinct: bool,
}

impl Bodies {
    fn new(fixture: &[u8], distinct: bool) -> Self {
        let mut v: serde_json::Value = serde_json::from_slice(fixture).expect("fixture JSON");
        v["request"]["uid"] = serde_json::json!("@UID@");
        if distinct {
            v["request"]["object"]["metadata"]["labels"]["bench-pod"] = serde_json::json!("@UID@");
        }
        Bodies {
            template: serde_json::to_string(&v).expect("JSON"),
            distinct,
        }
    }

    fn body(&self, client: usize, n: u64) -> Vec<u8> {
        self.template
            .replace("@UID@", &format!("c{client}-{n}"))
            .into_bytes()
    }

    fn name(&self) -> &'static str {
        if self.distinct {
            "distinct pods"
        } else {
            "replicas"
        }
    }
}

struct Server(Child);

/// Spawn `cmd` with its stdout piped, and wait for the address it announces (see
/// [`announced`]).
fn start(
    cmd: &mut Command,
    marker: &str,
    rest: Box<dyn std::io::Write + Send>,
) -> (Server, SocketAddr) {
    let mut server = Server(cmd.stdout(Stdio::piped()).spawn().expect("server"));
    let addr = announced(server.0.stdout.take().expect("stdout"), marker, rest);
    (server, addr)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// What the bare server prints on stdout once bound: `listening on <addr>`.
const BARE_LISTENING: &str = "listening on ";
/// What the injector prints on stdout once bound: `serving https://<addr>/inject`.
const INJECTOR_LISTENING: &str = "serving https://";

/// The address a child announces on `out` (the first line containing `marker`, followed by
/// the address); the rest of its output is then copied to `rest` (or dropped) in a thread, so
/// that the child never blocks on a full pipe.
fn announced(
    out: impl std::io::Read + Send + 'static,
    marker: &str,
    mut rest: Box<dyn std::io::Write + Send>,
) -> SocketAddr {
    use std::io::{BufRead, Write};
    let mut lines = std::io::BufReader::new(out);
    let mut line = String::new();
    let addr = loop {
        line.clear();
        let n = lines.read_line(&mut line).expect("child output");
        assert!(n > 0, "the server exited before saying where it listens");
        if let Some((_, after)) = line.split_once(marker) {
            let text = after.trim().trim_end_matches("/inject");
            break text.parse::<SocketAddr>().expect("announced address");
        }
        let _ = rest.write_all(line.as_bytes());
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut lines, &mut rest);
    });
    addr
}

fn write_cert(dir: &Path) -> String {
    let policy = Policy {
        dns_names: vec!["127.0.0.1".into()],
        cert_validity: Duration::from_secs(3600),
        cert_renew_after: Duration::from_secs(2400),
        ca_validity: Duration::from_secs(86400),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let (ca, ca_key) = new_ca(&policy, now).expect("CA");
    let (crt, key) = issue(&policy, &ca, &ca_key, now).expect("cert");
    std::fs::write(dir.join("tls.crt"), crt).expect("write");
    std::fs::write(dir.join("tls.key"), key).expect("write");
    ca
}

fn client(ca_pem: &str) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.expect("PEM")).expect("CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout(Duration::from_secs(10))
        .build()
}

fn post(agent: &ureq::Agent, url: &str, body: &[u8]) -> bool {
    agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_bytes(body)
        .ok()
        .and_then(|r| r.into_string().ok())
        .is_some_and(|b| b.contains("\"allowed\":true"))
}

fn wait_up(agent: &ureq::Agent, addr: SocketAddr, body: &[u8]) {
    let start = Instant::now();
    while !post(agent, &format!("https://{addr}/inject"), body) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Closed loop: `clients` threads posting as fast as answers come. (req/s, peak RSS KiB).
fn throughput(
    ca: &str,
    addr: SocketAddr,
    bodies: &Bodies,
    clients: usize,
    secs: u64,
    pid: u32,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let url = format!("https://{addr}/inject");
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, done, url, bodies, agent) = (
                stop.clone(),
                done.clone(),
                url.clone(),
                bodies.clone(),
                client(ca),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    assert!(post(&agent, &url, &bodies.body(c, n)), "request failed");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500)); // warm-up
    let (n0, t0, cpu0) = (done.load(Ordering::Relaxed), Instant::now(), cpu_ticks(pid));
    let client0 = cpu_ticks(std::process::id());
    let mut rss = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        rss = rss.max(rss_kib(pid));
    }
    let n = done.load(Ordering::Relaxed) - n0;
    let cpu = cpu_ticks(pid) - cpu0;
    let client = cpu_ticks(std::process::id()) - client0;
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client");
    }
    // Clock ticks are 1/100 s on Linux.
    let per_request = |ticks: u64| ticks as f64 * 10_000.0 / n.max(1) as f64;
    Run {
        rps: n as f64 / took.as_secs_f64(),
        rss,
        server_us: per_request(cpu),
        client_us: per_request(client),
    }
}

/// One timed run against one server.
struct Run {
    rps: f64,
    /// The server's peak resident memory (KiB).
    rss: u64,
    /// The server's CPU time (user + system) per request.
    server_us: f64,
    /// The clients' (this process's, the other servers idle) per request: they share the
    /// machine's cores with the server.
    client_us: f64,
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            // Fields 14 and 15 of stat; `after` starts at field 3.
            Some(after.get(11)?.parse::<u64>().ok()? + after.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Open loop at `rate` req/s over 4 keep-alive connections: (p50, p99, requests, peak RSS).
fn fixed_rate(
    ca: &str,
    addr: SocketAddr,
    bodies: &Bodies,
    rate: u64,
    secs: u64,
    pid: Option<u32>,
) -> (Duration, Duration, usize, u64) {
    let conns = 4u64;
    let url = format!("https://{addr}/inject");
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let (url, bodies, agent) = (url.clone(), bodies.clone(), client(ca));
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut n = 0u64;
                let start = Instant::now() + interval.mul_f64(i as f64 / conns as f64);
                let mut next = start;
                while next < start + Duration::from_secs(secs) {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    n += 1;
                    let body = bodies.body(i as usize, n);
                    // Measured from the scheduled send time: no coordinated omission.
                    assert!(post(&agent, &url, &body), "request failed");
                    lat.push(Instant::now().saturating_duration_since(next));
                    next += interval;
                }
                lat
            })
        })
        .collect();
    let mut rss = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(p) = pid {
            rss = rss.max(rss_kib(p));
        }
    }
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client"))
        .collect();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (pct(0.50), pct(0.99), all.len(), rss)
}

/// The baseline: same hyper/tokio-rustls stack and certificate; parses the AdmissionReview
/// and answers "allowed". Multi-threaded runtime, like the injector.
fn bare_server(args: &str) {
    let mut parts = args.split(' ');
    let (addr, cert, key) = (
        parts.next().expect("addr").to_string(),
        parts.next().expect("cert").to_string(),
        parts.next().expect("key").to_string(),
    );
    // The ceiling server's answer (the injector's, for the fixture); none: plain "allowed".
    let canned: Arc<podwire_injector::AdmissionResponse> = Arc::new(
        parts
            .next()
            .map(|p| {
                serde_json::from_slice(&std::fs::read(p).expect("canned answer")).expect("JSON")
            })
            .unwrap_or_else(|| podwire_injector::AdmissionResponse {
                allowed: true,
                ..Default::default()
            }),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let certs: Vec<_> =
            rustls_pemfile::certs(&mut std::fs::read(&cert).expect("cert").as_slice())
                .collect::<Result<_, _>>()
                .expect("certs");
        let key = rustls_pemfile::private_key(&mut std::fs::read(&key).expect("key").as_slice())
            .expect("key")
            .expect("key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("cert");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let bound = listener.local_addr().expect("bound address");
            writeln!(out, "{BARE_LISTENING}{bound}").expect("stdout");
            out.flush().expect("stdout");
        }
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, canned) = (acceptor.clone(), canned.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let canned = canned.clone();
                    async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let uid = serde_json::from_slice::<AdmissionReview>(&body)
                            .ok()
                            .and_then(|r| r.request)
                            .map(|r| r.uid)
                            .unwrap_or_default();
                        let answer = AdmissionReview::answer(podwire_injector::AdmissionResponse {
                            uid,
                            ..(*canned).clone()
                        });
                        // Encoded as the injector encodes its answers.
                        let out = answer.to_json().unwrap_or_default();
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            out,
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
}
