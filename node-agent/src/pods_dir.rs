//! The `serve` pod source: Pod manifests read from one directory.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory is read (hidden files,
//! i.e. editor and lock files starting with `.`, are not). A YAML file may hold several
//! documents separated by `---`; a JSON file may hold several JSON values one after the other.
//! Documents of `kind: Pod` are kept, `kind: List` / `PodList` are looked into, anything else
//! (Deployments, Services, ...) is ignored. A document that cannot be used never hides the
//! other documents of its file, nor the other files, but it is not forgotten either: a pod
//! whose manifest cannot be read is *unknown*, never "not a mesh pod". When its namespace/name
//! can be recovered, look-ups of that pod are answered with the error (file, document, field);
//! when not, the whole directory is *degraded*: a name it does not hold is then unknown too,
//! since the unreadable document may be that pod.

use crate::error::Error;
use podwire_core::PodInfo;
use serde_yaml_ng::Value;
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Manifest files larger than this are skipped (a Pod manifest is a few KiB).
pub const MAX_FILE_BYTES: u64 = 16 << 20;

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Pods keyed by namespace then name, and what could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pods {
    by_namespace: HashMap<String, HashMap<String, PodInfo>>,
    len: usize,
    /// Pods whose manifest could not be read, by (namespace, name): what is wrong.
    unreadable: HashMap<(String, String), String>,
    /// Problems that may hide a pod whose name cannot be recovered (a syntax error, a truncated
    /// or unreadable file, ...). While there is one, "not found" is not an answer.
    degraded: Vec<String>,
}

impl Pods {
    /// The pod `namespace/name`, if present (`namespace` as [`PodInfo::namespace`] gives it).
    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.by_namespace.get(namespace)?.get(name)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// What is wrong with the manifest of `namespace/name`, if it could not be read.
    pub fn unreadable(&self, namespace: &str, name: &str) -> Option<&str> {
        self.unreadable
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(String::as_str)
    }

    /// Problems that keep the source from ruling any pod out (empty when it can).
    pub fn degraded(&self) -> &[String] {
        &self.degraded
    }

    /// Records the manifest of `namespace/name` as unreadable (the first problem is kept).
    pub fn mark_unreadable(&mut self, namespace: &str, name: &str, problem: String) {
        self.unreadable
            .entry((namespace.to_owned(), name.to_owned()))
            .or_insert(problem);
    }

    pub fn mark_degraded(&mut self, problem: String) {
        self.degraded.push(problem);
    }

    /// What a person must know about this set after a (re)load, when something is wrong.
    pub fn health(&self) -> Option<String> {
        match (self.unreadable.len(), self.degraded.len()) {
            (0, 0) => None,
            (pods, 0) => Some(format!(
                "DEGRADED: {pods} pod(s) have manifests that cannot be read; their look-ups fail \
                 (the plugin fails closed) until the manifests are fixed"
            )),
            (pods, problems) => Some(format!(
                "DEGRADED: {pods} pod(s) have manifests that cannot be read and {problems} \
                 problem(s) hide which pods a manifest defines; until they are fixed, a pod not \
                 found is answered as unknown (the plugin fails closed): {}",
                self.degraded.join("; ")
            )),
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `pod` under (`pod.namespace()`, `metadata.name`); returns the pod it replaced.
    pub fn insert(&mut self, pod: PodInfo) -> Option<PodInfo> {
        let previous = self
            .by_namespace
            .entry(pod.namespace().to_owned())
            .or_default()
            .insert(pod.metadata.name.clone(), pod);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }
}

/// The current pod set, replaced whole on every reload; readers take a cheap snapshot.
///
/// It also knows whether the directory changed since the set was read (the watch counts every
/// change as it is seen, a reload records the count it read after), and which files are being
/// written: a look-up must not be answered from a set the directory has moved past, nor from a
/// half-written manifest (which may still parse, as a pod without its proxy).
#[derive(Debug, Default)]
pub struct PodStore {
    current: RwLock<Arc<Pods>>,
    /// Changes seen by the watch.
    changed: AtomicU64,
    /// The value of `changed` the current set was read after.
    loaded: AtomicU64,
    reloaded: tokio::sync::Notify,
    /// Files written to and not closed yet, with when they were last written.
    writing: Mutex<HashMap<PathBuf, Instant>>,
    /// The watched directory, where look-ups drop their sync markers.
    dir: std::sync::OnceLock<PathBuf>,
    /// Sync markers made, and the highest seen by the watch (see [`PodStore::settled`]).
    markers_made: AtomicU64,
    markers_seen: AtomicU64,
    /// A look-up is waiting: the reload should not wait for the directory to go quiet.
    pub(crate) hurry: tokio::sync::Notify,
    /// The watched directory itself was removed or replaced: nothing it holds is seen now.
    lost: std::sync::atomic::AtomicBool,
}

/// The name of a look-up's sync marker: hidden (never read as a manifest), then this agent's
/// own tag (another agent on the same directory has other markers), then the number.
pub const MARKER_PREFIX: &str = ".podwire-agent-sync-";

/// This process's marker tag: its pid and start time, so that markers of another agent (or an
/// earlier run of this one) are never taken for its own.
fn marker_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{}-{t}", std::process::id())
    })
}

/// The name of this agent's sync marker number `n`.
pub fn marker_name(n: u64) -> String {
    format!("{MARKER_PREFIX}{}-{n}", marker_tag())
}

/// The number of this agent's sync marker called `name`, if it is one.
pub fn own_marker(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(MARKER_PREFIX)?;
    let n = rest.strip_prefix(marker_tag())?.strip_prefix('-')?;
    n.parse().ok()
}

/// Whether `name` is any agent's sync marker (never a manifest, never a change).
pub fn is_marker(name: &str) -> bool {
    name.starts_with(MARKER_PREFIX)
}

/// A file written to but never closed (a writer that hung) counts as being
/// written for this long after its last write, then is read as it is.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl PodStore {
    pub fn snapshot(&self) -> Arc<Pods> {
        // A poisoned lock still holds a complete `Arc`: the swap below cannot leave it half-done.
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Swaps in a set read from the directory as it was when [`PodStore::load_mark`] returned
    /// `mark`.
    pub fn replace(&self, pods: Pods, mark: u64) {
        let pods = Arc::new(pods);
        match self.current.write() {
            Ok(mut guard) => *guard = pods,
            Err(poisoned) => *poisoned.into_inner() = pods,
        }
        self.loaded.fetch_max(mark, Ordering::SeqCst);
        self.reloaded.notify_waiters();
    }

    /// Taken before reading the directory: what the set read next will be current as of.
    pub fn load_mark(&self) -> u64 {
        self.changed.load(Ordering::SeqCst)
    }

    /// The directory the watch is on (sync markers go there).
    pub fn watching(&self, dir: &Path) {
        let _ = self.dir.set(dir.to_owned());
    }

    /// The watch saw a look-up's sync marker (its number).
    pub fn note_marker(&self, n: u64) {
        self.markers_seen.fetch_max(n, Ordering::SeqCst);
        self.reloaded.notify_waiters();
    }

    /// The watch saw a change. `written`: files written to (`true`: maybe half-written until
    /// closed) or closed, removed, moved away or replaced whole by a rename (`false`).
    pub fn note_change(&self, written: &[(&Path, bool)]) {
        if !written.is_empty() {
            let mut w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
            for (path, open) in written {
                if *open {
                    w.insert(path.to_path_buf(), Instant::now());
                } else {
                    w.remove(*path);
                }
            }
        }
        self.changed.fetch_add(1, Ordering::SeqCst);
    }

    /// The watched directory itself went away (removed, moved, replaced): look-ups fail
    /// closed, saying so, until the agent is restarted on the new one.
    pub fn lose_directory(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.reloaded.notify_waiters();
    }

    /// Whether the watched directory went away.
    pub fn directory_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Whether the directory changed since the current set was read.
    pub fn pending(&self) -> bool {
        self.loaded.load(Ordering::SeqCst) < self.changed.load(Ordering::SeqCst)
    }

    /// Files being written now (written to within [`WRITE_TIMEOUT`], not closed since).
    pub fn being_written(&self) -> Vec<PathBuf> {
        let w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        w.iter()
            .filter(|(_, at)| at.elapsed() < WRITE_TIMEOUT)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Waits until the set is current, at most `limit`; whether it is.
    ///
    /// First, every change made to the directory before this call must have reached the
    /// watch: the kernel queues a directory's events in order, so once the watch sees a
    /// marker file made now, it has seen everything before it (a manifest renamed in just
    /// before the look-up, a write to one). Then no change seen may be newer than the set.
    pub async fn settled(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        if let Some(dir) = self.dir.get() {
            let n = self.markers_made.fetch_add(1, Ordering::SeqCst) + 1;
            let marker = dir.join(marker_name(n));
            // Off the runtime's thread: a slow filesystem must not stall other look-ups.
            let made = tokio::task::spawn_blocking(move || {
                let made = std::fs::File::create(&marker).is_ok();
                let _ = std::fs::remove_file(&marker);
                made
            })
            .await
            .unwrap_or(false);
            // A directory the agent cannot write to gets no marker: only the changes the
            // watch has already seen are waited for.
            if made {
                loop {
                    let seen = self.reloaded.notified();
                    if self.markers_seen.load(Ordering::SeqCst) >= n {
                        break;
                    }
                    if self.directory_lost()
                        || tokio::time::timeout_at(deadline, seen).await.is_err()
                    {
                        return false;
                    }
                }
            }
        }
        loop {
            // Registered before the check: a reload between the two still wakes it.
            let reloaded = self.reloaded.notified();
            if self.directory_lost() {
                return false;
            }
            if !self.pending() {
                return true;
            }
            // Someone waits: read the directory now rather than after it goes quiet.
            self.hurry.notify_one();
            if tokio::time::timeout_at(deadline, reloaded).await.is_err() {
                return !self.pending() && !self.directory_lost();
            }
        }
    }
}

/// Reads every manifest in `dir`. Only a directory that cannot be listed is an error; problems
/// with single files or documents are logged (with the file name) and recorded in the result:
/// per pod when its namespace/name can be recovered, else as a degradation of the whole set.
/// The files in `being_written` are not read: each degrades the set (the pods it defines are
/// unknown until it is closed, and so is any pod not found).
pub fn load_dir(dir: &Path, being_written: &[PathBuf]) -> Result<Pods, Error> {
    let entries = fs::read_dir(dir).map_err(|source| Error::PodsDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut listing_problems = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if is_manifest_name(&path) {
                    files.push(path);
                }
            }
            Err(source) => {
                let err = Error::PodsDir {
                    path: dir.to_owned(),
                    source,
                };
                tracing::warn!("{err}");
                listing_problems.push(err.to_string());
            }
        }
    }
    // Sorted, so that when two files define the same pod the outcome does not depend on
    // the directory's order.
    files.sort();

    let mut pods = Pods::default();
    for problem in listing_problems {
        pods.mark_degraded(problem);
    }
    for path in files {
        if being_written.contains(&path) {
            let problem = format!(
                "{} is being written (written to and not closed yet); the pods it defines are \
                 unknown until it is closed (write manifests elsewhere and rename them in)",
                path.display()
            );
            tracing::info!("{problem}");
            pods.mark_degraded(problem);
            continue;
        }
        let text = match read_manifest(&path) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(err) => {
                tracing::warn!("{err}: any pod not found is unknown until it can be read");
                pods.mark_degraded(err.to_string());
                continue;
            }
        };
        let (found, problems) = parse_manifest(&path, &text);
        for problem in problems {
            match problem.pod() {
                Some((namespace, name)) => {
                    tracing::warn!(
                        "{problem}: look-ups of pod {namespace}/{name} fail until it is fixed"
                    );
                    pods.mark_unreadable(namespace, name, problem.to_string());
                }
                None => {
                    tracing::warn!("{problem}: any pod not found is unknown until it is fixed");
                    pods.mark_degraded(problem.to_string());
                }
            }
        }
        for pod in found {
            let name = pod.display_name();
            if pods.insert(pod).is_some() {
                tracing::warn!(
                    "pod {name} is defined again in {}: the later definition wins",
                    path.display()
                );
            }
        }
    }
    Ok(pods)
}

/// `*.yaml`, `*.yml` or `*.json`, and not hidden.
fn is_manifest_name(path: &Path) -> bool {
    let visible = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    visible && extension.is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_json(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The file's text; `None` when the name does not point to a regular file (e.g. a directory).
fn read_manifest(path: &Path) -> Result<Option<String>, Error> {
    let read_error = |source| Error::ReadFile {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        // Removed between the listing and now: it simply is not there any more.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_error(err)),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_error(err)),
    };
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::FileTooLarge {
            path: path.to_owned(),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(Some(text))
}

/// The pods in one manifest file's text, and the problems met on the way. `path` is used for
/// messages and, by its extension, to choose JSON or YAML.
pub fn parse_manifest(path: &Path, text: &str) -> (Vec<PodInfo>, Vec<Error>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pods = Vec::new();
    let mut problems = Vec::new();
    let mut report = |index: usize, line: usize, problem: Problem| {
        problems.push(Error::Document {
            path: path.to_owned(),
            index,
            line,
            message: problem.message,
            pod: problem.pod,
        });
    };

    if is_json(path) {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        let (mut index, mut line, mut counted) = (0, 1, 0);
        loop {
            // The line where the next value starts, counted on from the previous one.
            let rest = &text[stream.byte_offset()..];
            let start = text.len() - rest.trim_start().len();
            line += text[counted..start].matches('\n').count();
            counted = start;
            let next = stream.next();
            index += 1;
            match next {
                None => break,
                Some(Ok(json)) => match serde_yaml_ng::to_value(json) {
                    Ok(value) => {
                        for message in collect_pods(value, &mut pods) {
                            report(index, line, message);
                        }
                    }
                    Err(err) => report(index, line, Problem::anonymous(err.to_string())),
                },
                Some(Err(err)) => {
                    // A JSON stream cannot be resynchronised after a syntax error.
                    report(
                        index,
                        line,
                        Problem::anonymous(format!("{err} (the rest of the file is skipped)")),
                    );
                    break;
                }
            }
        }
    } else {
        for (index, (line, document)) in yaml_documents(text).into_iter().enumerate() {
            match serde_yaml_ng::from_str::<Value>(&document) {
                Ok(value) => {
                    for message in collect_pods(value, &mut pods) {
                        report(index + 1, line, message);
                    }
                }
                Err(err) => report(index + 1, line, Problem::anonymous(err.to_string())),
            }
        }
    }
    (pods, problems)
}

/// Splits a YAML stream into its non-empty documents: (1-based first line, text). Each text is
/// preceded by as many empty lines as the document is deep in the file, so that the parser's
/// error positions are the file's. A line starting with `---` followed by a blank or the end of
/// the line always starts a document (YAML forbids it inside a document's content), so a
/// syntax error in one document cannot swallow the next ones.
fn yaml_documents(text: &str) -> Vec<(usize, String)> {
    fn is_start(line: &str) -> bool {
        line.strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    }
    fn is_blank(document: &str) -> bool {
        document.lines().all(|line| {
            let rest = if is_start(line) {
                &line[3..]
            } else if line.trim_end() == "..." {
                ""
            } else {
                line
            };
            let rest = rest.trim();
            rest.is_empty() || rest.starts_with('#')
        })
    }

    let mut documents = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    for (number, line) in text.split_inclusive('\n').enumerate() {
        let number = number + 1;
        if is_start(line) && number > 1 {
            if !is_blank(&current) {
                documents.push((first_line, std::mem::take(&mut current)));
            }
            current = "\n".repeat(number - 1);
            first_line = number;
        }
        current.push_str(line);
    }
    if !is_blank(&current) {
        documents.push((first_line, current));
    }
    documents
}

/// What is wrong with one document, and the pod it is about when that can be told.
#[derive(Debug)]
struct Problem {
    message: String,
    pod: Option<(String, String)>,
}

impl Problem {
    fn anonymous(message: String) -> Problem {
        Problem { message, pod: None }
    }
}

/// Adds the pods `value` holds to `pods`; returns what is wrong with it (nothing for a document
/// of another kind, which is simply not a pod).
fn collect_pods(value: Value, pods: &mut Vec<PodInfo>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let kind = value.get("kind").map(|k| k.as_str().map(str::to_owned));
    match kind.as_ref().map(|k| k.as_deref()) {
        Some(Some("Pod")) => match pod_from(value) {
            Ok(pod) => pods.push(pod),
            Err(problem) => problems.push(problem),
        },
        Some(Some(kind @ ("List" | "PodList"))) => {
            let implied_pod = kind == "PodList";
            let Value::Mapping(mut map) = value else {
                return problems;
            };
            let items = match map.remove("items") {
                Some(Value::Sequence(items)) => items,
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    problems.push(Problem::anonymous(format!("{kind}: `items` is not a list")));
                    return problems;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                match item.get("kind").map(Value::as_str) {
                    Some(Some("Pod")) => collect_item(i, item, pods, &mut problems),
                    None if implied_pod => collect_item(i, item, pods, &mut problems),
                    Some(Some(kind)) => tracing::debug!("ignoring items[{i}] of kind {kind}"),
                    // No kind, or not a string, outside a PodList: may be a pod, cannot tell.
                    _ => problems.push(Problem {
                        message: format!("items[{i}]: `kind` missing or not a string"),
                        pod: pod_key(&item),
                    }),
                }
            }
        }
        Some(Some(kind)) => tracing::debug!("ignoring a document of kind {kind}"),
        Some(None) => problems.push(Problem {
            message: "`kind` is not a string".to_owned(),
            pod: pod_key(&value),
        }),
        None if matches!(value, Value::Null) => {}
        None => problems.push(Problem {
            message: "not a Kubernetes object (no `kind`)".to_owned(),
            pod: pod_key(&value),
        }),
    }
    problems
}

fn collect_item(i: usize, item: Value, pods: &mut Vec<PodInfo>, problems: &mut Vec<Problem>) {
    match pod_from(item) {
        Ok(pod) => pods.push(pod),
        Err(mut problem) => {
            problem.message = format!("items[{i}]: {}", problem.message);
            problems.push(problem);
        }
    }
}

/// (namespace, name) of a document that could not be read as a Pod, when it has a name.
fn pod_key(value: &Value) -> Option<(String, String)> {
    let metadata = value.get("metadata")?;
    let name = metadata.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = match metadata.get("namespace").map(Value::as_str) {
        None | Some(Some("")) => "default",
        Some(Some(ns)) => ns,
        // A namespace that is not a string: the pod cannot be placed.
        Some(None) => return None,
    };
    Some((namespace.to_owned(), name.to_owned()))
}

fn pod_from(value: Value) -> Result<PodInfo, Problem> {
    let pod: PodInfo = match serde_yaml_ng::from_value(value.clone()) {
        Ok(pod) => pod,
        Err(err) => {
            let at = error_path(&value)
                .map(|path| format!(" at {path}"))
                .unwrap_or_default();
            let key = pod_key(&value);
            let who = key
                .as_ref()
                .map(|(ns, name)| format!(" {ns}/{name}"))
                .unwrap_or_default();
            return Err(Problem {
                message: format!("Pod{who} cannot be read{at}: {err}"),
                pod: key,
            });
        }
    };
    if pod.metadata.name.is_empty() {
        return Err(Problem::anonymous(format!(
            "Pod {} has no metadata.name, so it cannot be looked up",
            pod.display_name()
        )));
    }
    Ok(pod)
}

/// One step of a path into a YAML value.
#[derive(Debug, Clone)]
enum Step {
    Key(Value),
    Index(usize),
}

fn child<'a>(value: &'a Value, step: &Step) -> Option<&'a Value> {
    match (value, step) {
        (Value::Mapping(map), Step::Key(key)) => map.get(key),
        (Value::Sequence(seq), Step::Index(i)) => seq.get(*i),
        _ => None,
    }
}

/// `value` without the node at `path`.
fn without(value: &Value, path: &[Step]) -> Value {
    let mut value = value.clone();
    let Some((last, parents)) = path.split_last() else {
        return value;
    };
    let mut node = &mut value;
    for step in parents {
        let next = match (node, step) {
            (Value::Mapping(map), Step::Key(key)) => map.get_mut(key),
            (Value::Sequence(seq), Step::Index(i)) => seq.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => node = next,
            None => return value,
        }
    }
    match (node, last) {
        (Value::Mapping(map), Step::Key(key)) => {
            map.remove(key);
        }
        (Value::Sequence(seq), Step::Index(i)) if *i < seq.len() => {
            seq.remove(*i);
        }
        _ => {}
    }
    value
}

/// The field that keeps `value` from being read as a Pod (`metadata.labels.app`), found by
/// removing nodes until it reads: serde's errors from a `Value` carry no path. Only run on the
/// error path, on one small document.
fn error_path(value: &Value) -> Option<String> {
    let reads = |v: &Value| serde_yaml_ng::from_value::<PodInfo>(v.clone()).is_ok();
    let mut path: Vec<Step> = Vec::new();
    let mut node = value;
    'descend: loop {
        let steps: Vec<Step> = match node {
            Value::Mapping(map) => map.keys().cloned().map(Step::Key).collect(),
            Value::Sequence(seq) => (0..seq.len()).map(Step::Index).collect(),
            _ => break,
        };
        for step in steps {
            let mut candidate = path.clone();
            candidate.push(step.clone());
            if reads(&without(value, &candidate)) {
                match child(node, &step) {
                    Some(next) => node = next,
                    None => break 'descend,
                }
                path = candidate;
                continue 'descend;
            }
        }
        break;
    }
    if path.is_empty() {
        return None;
    }
    let mut text = String::new();
    for step in &path {
        match step {
            Step::Key(Value::String(key)) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Step::Key(other) => {
                let key = serde_yaml_ng::to_string(other).unwrap_or_default();
                text.push_str(&format!("[{}]", key.trim()));
            }
            Step::Index(i) => text.push_str(&format!("[{i}]")),
        }
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> (Vec<PodInfo>, Vec<Error>) {
        parse_manifest(Path::new(name), text)
    }

    fn names(pods: &[PodInfo]) -> Vec<String> {
        pods.iter().map(PodInfo::display_name).collect()
    }

    #[test]
    fn multi_document_yaml_keeps_only_pods() {
        let (pods, problems) = parse(
            "m.yaml",
            "# leading comment\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\n\
             ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n\
             --- # a comment after the marker\nkind: Pod\nmetadata:\n  name: b\n...\n---\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names(&pods), ["shop/a", "default/b"]);
    }

    #[test]
    fn a_broken_document_does_not_hide_the_next() {
        let (pods, problems) = parse(
            "m.yml",
            "kind: Pod\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: [unclosed\n---\n\
             kind: Pod\nmetadata: {name: c, annotations: [not, a, map]}\n---\n\
             kind: Pod\nmetadata: {name: d}\n",
        );
        assert_eq!(names(&pods), ["default/a", "default/d"]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let first = problems[0].to_string();
        assert!(first.contains("m.yml document 2 (from line 3)"), "{first}");
        // The parser's own position is the file's line, not the document's.
        assert!(
            first.contains("line 6") || first.contains("line 5"),
            "{first}"
        );
        assert!(problems[1].to_string().contains("document 3"));
    }

    #[test]
    fn block_scalars_and_marker_lookalikes_stay_in_their_document() {
        let (pods, problems) = parse(
            "m.yaml",
            "kind: Pod\nmetadata:\n  name: a\n  annotations:\n    note: |\n      ---x\n      --- indented\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            pods[0].annotation("note"),
            Some("---x\n--- indented\n"),
            "{pods:?}"
        );
    }

    #[test]
    fn json_stream_and_lists() {
        let (pods, problems) = parse(
            "p.json",
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"a","namespace":"x","uid":"u"}}
               {"kind":"PodList","items":[{"metadata":{"name":"b"}}]}
               {"kind":"List","items":[{"kind":"Service","metadata":{"name":"s"}},
                                       {"kind":"Pod","metadata":{"name":"c"}}]}"#,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(names(&pods), ["x/a", "default/b", "default/c"]);
    }

    #[test]
    fn broken_json_keeps_what_came_before() {
        let (pods, problems) = parse(
            "p.json",
            "{\"kind\":\"Pod\",\"metadata\":{\"name\":\"a\"}}\n{\"kind\": nope}\n",
        );
        assert_eq!(names(&pods), ["default/a"]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0]
            .to_string()
            .contains("p.json document 2 (from line 2)"));
    }

    #[test]
    fn unnamed_and_kindless_documents_are_reported() {
        let (pods, problems) = parse(
            "m.yaml",
            "kind: Pod\nmetadata: {generateName: web-}\n---\nmetadata: {name: x}\n---\njust text\n",
        );
        assert!(pods.is_empty());
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].to_string().contains("no metadata.name"));
    }

    #[test]
    fn unreadable_pods_are_named_with_the_field() {
        let (pods, problems) = parse(
            "db.yaml",
            "kind: Pod\nmetadata: {name: db-0, namespace: shop, labels: {app: 5}}\n---\n\
             kind: Pod\nmetadata: {name: web}\nspec:\n  containers:\n  - name: istio-proxy\n    \
             securityContext: {runAsUser: \"1337; -j DROP\"}\n",
        );
        assert!(pods.is_empty(), "{pods:?}");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].pod(), Some(("shop", "db-0")));
        let first = problems[0].to_string();
        assert!(
            first.contains("db.yaml") && first.contains("at metadata.labels.app"),
            "{first}"
        );
        assert_eq!(problems[1].pod(), Some(("default", "web")));
        let second = problems[1].to_string();
        assert!(
            second.contains("spec.containers[0].securityContext.runAsUser"),
            "{second}"
        );
        // A syntax error hides the name: no pod to blame.
        let (_, problems) = parse("t.json", "{\"kind\":\"Pod\",\"metadata\":{\"name\":\"x\"");
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].pod(), None);
    }

    #[test]
    fn pods_are_keyed_by_namespace_and_name() {
        let mut pods = Pods::default();
        let mut pod = PodInfo::default();
        pod.metadata.name = "a".into();
        assert!(pods.insert(pod.clone()).is_none());
        assert!(pods.insert(pod.clone()).is_some());
        pod.metadata.namespace = "other".into();
        assert!(pods.insert(pod).is_none());
        assert_eq!(pods.len(), 2);
        assert!(pods.get("default", "a").is_some());
        assert!(pods.get("other", "a").is_some());
        assert!(pods.get("", "a").is_none());
        assert!(!pods.is_empty());
    }

    #[test]
    fn manifest_names() {
        assert!(is_manifest_name(Path::new("/d/a.yaml")));
        assert!(is_manifest_name(Path::new("/d/a.YML")));
        assert!(is_manifest_name(Path::new("/d/a.json")));
        assert!(!is_manifest_name(Path::new("/d/a.yaml~")));
        assert!(!is_manifest_name(Path::new("/d/.#a.yaml")));
        assert!(!is_manifest_name(Path::new("/d/a.txt")));
        assert!(!is_manifest_name(Path::new("/d/yaml")));
    }
}
