//! The Unix socket the CNI plugin asks for pods (protocol: [`podwire_core::lookup`]).
//!
//! One JSON line in, one JSON line out, then the connection is closed. Every request gets an
//! answer line, a bad one included (`status: error` says what is wrong), unless the client
//! goes away first.

use crate::error::Error;
use crate::metrics::Metrics;
use crate::pods_dir::{PodStore, Pods};
use podwire_core::lookup::{
    self, LookupRequest, LookupResponse, LookupStatus, PodMatch, PROTOCOL_VERSION,
};
use podwire_core::PodInfo;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// How long a client has to send its request line. The plugin writes it right after
/// connecting; idle clients must give their slot back well within the plugin's own 2 s.
pub const READ_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections handled at once: high, so that idle clients cannot starve the plugin (each
/// costs a task and a file descriptor, and is dropped after [`READ_TIMEOUT`]).
const MAX_CONNECTIONS: usize = 1024;
/// A request is a namespace, a name and a UID: far below the protocol's message limit, which
/// keeps [`MAX_CONNECTIONS`] buffers small.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The bound socket's file. Dropping it removes the file, unless it has been replaced by
/// another socket in the meantime (another agent's, which is not ours to remove).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                match fs::remove_file(&self.path) {
                    Ok(()) => tracing::debug!("removed {}", self.path.display()),
                    Err(err) => {
                        tracing::warn!("cannot remove {}: {err}", self.path.display())
                    }
                }
            }
            Ok(_) => tracing::warn!(
                "{} was replaced by another file: left in place",
                self.path.display()
            ),
            Err(_) => {} // already gone
        }
    }
}

/// Binds `path`: creates its parent directory (0700) when missing, removes a stale socket left
/// by an earlier run (never any other kind of file, nor a socket someone still listens on), and
/// makes the socket 0600.
pub async fn bind(path: &Path) -> Result<(UnixListener, SocketFile), Error> {
    let socket_error = |action: &'static str| {
        move |source: io::Error| Error::Socket {
            path: path.to_owned(),
            action,
            source,
        }
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(socket_error("create its directory"))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path));
            if let Ok(Ok(_)) = probe.await {
                return Err(Error::SocketInUse {
                    path: path.to_owned(),
                });
            }
            fs::remove_file(path).map_err(socket_error("remove the stale socket"))?;
            tracing::info!("removed a stale socket at {}", path.display());
        }
        Ok(_) => {
            return Err(Error::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(socket_error("inspect the existing file")(err)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error("bind"))?;
    let meta = fs::symlink_metadata(path).map_err(socket_error("inspect"))?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(socket_error("make it private (chmod 0600)"))?;
    Ok((listener, file))
}

/// Looks a pod up in the API server (the `run` mode's fallback for pods not in the cache):
/// `Ok(None)` only for the API server's own 404; `Err` for anything that is not an answer.
pub type Fallback = Arc<
    dyn Fn(String, String) -> Pin<Box<dyn Future<Output = Result<Option<PodInfo>, String>> + Send>>
        + Send
        + Sync,
>;

/// The pods a source holds: the pod directory's snapshot (`serve`) or the node-scoped watch's
/// reflector store (`run`).
pub trait PodIndex: Send + Sync {
    /// What is held for `request`'s namespace/name.
    fn held(&self, request: &LookupRequest) -> Held;
    /// Problems that may hide pods (manifests whose pod cannot even be named).
    fn degraded(&self) -> Vec<String> {
        Vec::new()
    }
}

impl PodIndex for PodStore {
    fn held(&self, request: &LookupRequest) -> Held {
        local(&self.snapshot(), request)
    }
    fn degraded(&self) -> Vec<String> {
        self.snapshot().degraded().to_vec()
    }
}

/// Where answers come from.
pub struct Source {
    pub store: Arc<dyn PodIndex>,
    /// `None`: the store is complete from the start (a directory). `Some(flag)`: complete once
    /// the flag is set (the first sync of a watch); before that a miss is not an answer.
    pub synced: Option<Arc<AtomicBool>>,
    /// Asked on a cache miss.
    pub fallback: Option<Fallback>,
    pub metrics: Option<Arc<Metrics>>,
    /// A directory's store: look-ups wait for it to catch up with the directory's changes.
    pub directory: Option<Arc<PodStore>>,
}

/// How long a look-up waits for the pods directory to be read again after a change (the
/// reload waits for 100 ms of quiet, at most 1 s), within the plugin's 2 s.
pub const SETTLE: Duration = Duration::from_millis(1400);

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

impl Source {
    pub fn directory(store: Arc<PodStore>) -> Source {
        let directory = Some(Arc::clone(&store));
        let store: Arc<dyn PodIndex> = store;
        Source {
            store,
            synced: None,
            fallback: None,
            metrics: None,
            directory,
        }
    }

    fn synced(&self) -> bool {
        self.synced
            .as_ref()
            .is_none_or(|s| s.load(Ordering::SeqCst))
    }

    async fn resolve(&self, line: &[u8]) -> LookupResponse {
        let request = match parse_request(line) {
            Ok(request) => request,
            Err(response) => return response,
        };
        // Never from a set the directory has moved past: a pod written a moment ago would be
        // "not found", a manifest being rewritten read as it was.
        if let Some(dir) = &self.directory {
            if !dir.settled(SETTLE).await {
                let message = if dir.directory_lost() {
                    "the pods directory was removed or replaced after podwire-agent serve \
                     started watching it: restart podwire-agent serve"
                        .to_string()
                } else {
                    format!(
                        "the pods directory changed and was not read again within {} ms; \
                         look-ups resume once it is",
                        SETTLE.as_millis()
                    )
                };
                return LookupResponse::new(LookupStatus::NotReady { message });
            }
        }
        let held = self.store.held(&request);
        let response = match held {
            Held::Found(pod) => LookupResponse::new(LookupStatus::Found { pod }),
            Held::Unreadable(problem) => LookupResponse::new(LookupStatus::Error {
                message: format!(
                    "the manifest of pod {}/{} cannot be read, so whether it is a mesh pod is \
                     unknown: {problem}; fix the manifest",
                    request.namespace, request.name
                ),
            }),
            Held::OtherUid(_) | Held::Absent => match &self.fallback {
                Some(get) => self.ask_api_server(get, &request, &held).await,
                None => LookupResponse::new(self.miss(&request, &held)),
            },
        };
        tracing::debug!(
            "look-up {}/{}{}: {}",
            request.namespace,
            request.name,
            if request.uid.is_empty() {
                String::new()
            } else {
                format!(" uid {}", request.uid)
            },
            outcome(&response.status)
        );
        response
    }

    /// A miss without an API server to ask: `notFound` only from a complete source.
    fn miss(&self, request: &LookupRequest, held: &Held) -> LookupStatus {
        if let Held::OtherUid(uid) = held {
            return lookup::other_uid(request, uid, "the pod source");
        }
        if !self.synced() {
            return LookupStatus::NotReady {
                message: "pod cache not synced yet".to_owned(),
            };
        }
        match self.store.degraded().as_slice() {
            [] => LookupStatus::NotFound,
            problems => LookupStatus::NotReady {
                message: format!(
                    "pod {}/{} is not among the readable manifests, but {} manifest \
                     problem(s) may hide it: {}; fix the manifests",
                    request.namespace,
                    request.name,
                    problems.len(),
                    problems.join("; ")
                ),
            },
        }
    }

    /// The cache cannot answer (no such pod, or another UID): only the API server can. Its
    /// 404 is "not found"; anything else it cannot tell is unknown, synced cache or not.
    async fn ask_api_server(
        &self,
        get: &Fallback,
        request: &LookupRequest,
        held: &Held,
    ) -> LookupResponse {
        let cache = match held {
            Held::OtherUid(uid) => format!("the node's pod cache holds UID {uid}"),
            _ => "not in the node's pod cache".to_owned(),
        };
        let status = match get(request.namespace.clone(), request.name.clone()).await {
            Ok(Some(pod)) => match lookup::pod_match(&pod, request) {
                PodMatch::Same => LookupStatus::Found { pod: Box::new(pod) },
                PodMatch::OtherUid { held } => lookup::other_uid(request, &held, "the API server"),
                PodMatch::Different => LookupStatus::Error {
                    message: format!(
                        "the API server answered another pod ({}) for {}/{}",
                        pod.display_name(),
                        request.namespace,
                        request.name
                    ),
                },
            },
            Ok(None) => LookupStatus::NotFound,
            Err(e) => LookupStatus::NotReady {
                message: format!(
                    "pod {}/{}: {cache} and the API server did not answer: {e}",
                    request.namespace, request.name
                ),
            },
        };
        LookupResponse::new(status)
    }
}

/// Answers look-ups from `source` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    source: Arc<Source>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return, // closed: never happens, the semaphore is ours
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // E.g. out of file descriptors: let some connections finish first.
                    tracing::warn!("accepting a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let source = Arc::clone(&source);
        tokio::spawn(async move {
            handle_connection(stream, &source).await;
            drop(slot);
        });
    }
}

async fn handle_connection(stream: UnixStream, source: &Source) {
    let started = Instant::now();
    let (read, mut write) = stream.into_split();
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(read)).await {
        Err(_) => error(format!(
            "no request line within {} ms",
            READ_TIMEOUT.as_millis()
        )),
        Ok(Err(err)) => {
            tracing::debug!("reading a request: {err}");
            return;
        }
        Ok(Ok(Request::Closed)) => {
            tracing::debug!("a client closed its connection without asking anything");
            return;
        }
        Ok(Ok(Request::TooLarge)) => {
            error(format!("request larger than {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(Ok(Request::Line(line))) => source.resolve(&line).await,
    };
    if let Some(m) = &source.metrics {
        m.lookup(&response.status, started.elapsed());
    }
    if let LookupStatus::Error { message } = &response.status {
        tracing::warn!("refused a look-up request: {message}");
    }
    let mut line = serde_json::to_vec(&response).unwrap_or_else(|err| {
        tracing::error!("encoding a look-up answer: {err}");
        br#"{"v":1,"status":"error","message":"the agent could not encode its answer"}"#.to_vec()
    });
    line.push(b'\n');
    let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("sending a look-up answer: {err}"),
        Err(_) => tracing::debug!("sending a look-up answer: timed out"),
    }
}

#[derive(Debug, PartialEq)]
enum Request {
    Line(Vec<u8>),
    TooLarge,
    Closed,
}

/// Reads one line (without its end) of at most [`MAX_REQUEST_BYTES`]; a client that closes
/// its side after the request instead of ending the line is understood too.
async fn read_request(read: impl AsyncRead + Unpin) -> io::Result<Request> {
    let limit = MAX_REQUEST_BYTES as u64 + 1; // the request plus its newline
    let mut reader = BufReader::new(read.take(limit));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Request::Line(line))
    } else if line.len() > MAX_REQUEST_BYTES {
        Ok(Request::TooLarge)
    } else if line.is_empty() {
        Ok(Request::Closed)
    } else {
        Ok(Request::Line(line))
    }
}

fn error(message: String) -> LookupResponse {
    LookupResponse::new(LookupStatus::Error { message })
}

/// What the held pods say about a request.
#[derive(Debug)]
pub enum Held {
    Found(Box<PodInfo>),
    /// The pod's manifest cannot be read: what is wrong.
    Unreadable(String),
    /// The name is held with another UID (this one).
    OtherUid(String),
    Absent,
}

fn local(pods: &Pods, request: &LookupRequest) -> Held {
    // An unreadable manifest wins over a readable one of the same name: which is meant
    // cannot be told.
    if let Some(problem) = pods.unreadable(&request.namespace, &request.name) {
        return Held::Unreadable(problem.to_owned());
    }
    match pods.get(&request.namespace, &request.name) {
        Some(pod) => match lookup::pod_match(pod, request) {
            PodMatch::Same => Held::Found(Box::new(pod.clone())),
            PodMatch::OtherUid { held } => Held::OtherUid(held),
            PodMatch::Different => Held::Absent,
        },
        None => Held::Absent,
    }
}

fn outcome(status: &LookupStatus) -> &str {
    match status {
        LookupStatus::Found { .. } => "found",
        LookupStatus::NotFound => "not found",
        LookupStatus::NotReady { message } | LookupStatus::Error { message } => message,
    }
}

/// The request in one line, or the error answer saying what is wrong with it.
fn parse_request(line: &[u8]) -> Result<LookupRequest, LookupResponse> {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(err) => return Err(error(format!("malformed request: not JSON: {err}"))),
    };
    if !value.is_object() {
        return Err(error("malformed request: not a JSON object".to_owned()));
    }
    match value.get("v") {
        None => {
            return Err(error(
                "malformed request: no protocol version `v`".to_owned(),
            ))
        }
        Some(v) if v.as_u64() != Some(u64::from(PROTOCOL_VERSION)) => {
            return Err(error(format!(
                "unsupported protocol version {v}: this agent speaks version {PROTOCOL_VERSION}"
            )))
        }
        Some(_) => {}
    }
    let mut request: LookupRequest = match serde_json::from_value(value) {
        Ok(request) => request,
        Err(err) => return Err(error(format!("malformed request: {err}"))),
    };
    if request.name.is_empty() {
        return Err(error("malformed request: empty pod name".to_owned()));
    }
    // As for a manifest, no namespace means `default` (the plugin under podman knows no other).
    if request.namespace.is_empty() {
        request.namespace = "default".to_owned();
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use podwire_core::PodInfo;

    fn pods() -> Pods {
        let mut pods = Pods::default();
        let mut pod = PodInfo::default();
        pod.metadata.name = "web".into();
        pod.metadata.uid = "u-1".into();
        pods.insert(pod.clone());
        pod.metadata.namespace = "shop".into();
        pod.metadata.uid.clear();
        pods.insert(pod);
        pods
    }

    fn status_in(pods: Pods, line: &str) -> LookupStatus {
        let store = Arc::new(PodStore::default());
        store.replace(pods, store.load_mark());
        let source = Source::directory(store);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(source.resolve(line.as_bytes())).status
    }

    fn status(line: &str) -> LookupStatus {
        status_in(pods(), line)
    }

    fn error_message(line: &str) -> String {
        match status(line) {
            LookupStatus::Error { message } => message,
            other => panic!("expected an error for {line}, got {other:?}"),
        }
    }

    #[test]
    fn found_and_not_found() {
        let found = |line| matches!(status(line), LookupStatus::Found { .. });
        assert!(found(r#"{"v":1,"namespace":"default","name":"web"}"#));
        assert!(found(r#"{"v":1,"namespace":"","name":"web","uid":"u-1"}"#));
        assert!(found(
            r#"{"v":1,"namespace":"shop","name":"web","uid":"any"}"#
        ));
        assert!(!found(r#"{"v":1,"namespace":"shop","name":"api"}"#));
        assert_eq!(
            status(r#"{"v":1,"namespace":"other","name":"web"}"#),
            LookupStatus::NotFound
        );
    }

    #[test]
    fn another_uid_is_unknown_never_not_found() {
        match status(r#"{"v":1,"namespace":"default","name":"web","uid":"u-2"}"#) {
            LookupStatus::NotReady { message } => {
                assert!(
                    message.contains("UID u-1") && message.contains("UID u-2"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreadable_manifests_make_answers_unknown() {
        let mut with_pod = pods();
        with_pod.mark_unreadable("shop", "db-0", "db.yaml: labels.app".into());
        match status_in(with_pod, r#"{"v":1,"namespace":"shop","name":"db-0"}"#) {
            LookupStatus::Error { message } => assert!(message.contains("db.yaml"), "{message}"),
            other => panic!("{other:?}"),
        }
        let mut degraded = pods();
        degraded.mark_degraded("broken.json: EOF while parsing".into());
        match status_in(
            degraded.clone(),
            r#"{"v":1,"namespace":"shop","name":"db-0"}"#,
        ) {
            LookupStatus::NotReady { message } => {
                assert!(message.contains("broken.json"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // What can be read is still served.
        assert!(matches!(
            status_in(degraded, r#"{"v":1,"namespace":"default","name":"web"}"#),
            LookupStatus::Found { .. }
        ));
    }

    #[test]
    fn bad_requests_are_answered_with_errors() {
        assert!(error_message("garbage").contains("not JSON"));
        assert!(error_message("[1]").contains("not a JSON object"));
        assert!(error_message(r#"{"namespace":"a","name":"b"}"#).contains("version"));
        assert!(error_message(r#"{"v":2,"namespace":"a","name":"b"}"#)
            .contains("unsupported protocol version 2"));
        assert!(error_message(r#"{"v":"1","namespace":"a","name":"b"}"#).contains("version"));
        assert!(error_message(r#"{"v":1,"namespace":"a"}"#).contains("malformed"));
        assert!(error_message(r#"{"v":1,"namespace":"a","name":""}"#).contains("empty"));
    }

    #[tokio::test]
    async fn request_lines() {
        let read = |bytes: &'static [u8]| read_request(bytes);
        assert_eq!(
            read(b"{}\n").await.ok(),
            Some(Request::Line(b"{}".to_vec()))
        );
        assert_eq!(
            read(b"{}\r\nmore").await.ok(),
            Some(Request::Line(b"{}".to_vec()))
        );
        assert_eq!(read(b"{}").await.ok(), Some(Request::Line(b"{}".to_vec())));
        assert_eq!(read(b"").await.ok(), Some(Request::Closed));
        let mut big = vec![b'x'; MAX_REQUEST_BYTES];
        big.push(b'\n');
        let got = read_request(&big[..]).await.ok();
        assert!(matches!(got, Some(Request::Line(l)) if l.len() == MAX_REQUEST_BYTES));
        big.insert(0, b'x');
        assert_eq!(read_request(&big[..]).await.ok(), Some(Request::TooLarge));
    }
}
