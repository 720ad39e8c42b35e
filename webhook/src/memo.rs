//! Answers for pods seen before. A controller's replicas reach the webhook as byte-identical
//! pod objects (created from one template, not yet named: `generateName`, no uid), so a
//! Deployment of 50 replicas would render the same sidecar 50 times. The injector renders each
//! distinct pod once per config and namespace labels and answers its replicas from here: the
//! same bytes a fresh review gives, with the new request's uid.
//!
//! What an answer depends on is the whole key: the pod object's exact bytes, the request's
//! namespace and name, the namespace's labels, and the config (held, so that a changed config
//! empties the memo). Only pod CREATEs that were injected, skipped or refused are kept; every
//! other request, and any pod over [`Memo::MAX_OBJECT_BYTES`], takes the full review. The memo
//! holds at most [`Memo::MAX_ENTRIES`] answers and [`Memo::MAX_BYTES`], oldest evicted first.
//!
//! An answer is kept from an object's second sighting on: the first is only noted, by its key
//! (at most [`Memo::MAX_NOTED`] keys). Most pods that are not replicas (a StatefulSet's, a
//! Job's indexed pods, pods created by hand) are seen once, and copying each of them and its
//! answer into the memo, only to evict it unread, cost a distinct pod ~4 µs of CPU under load
//! (7% of its review) and cycled megabytes through the caches the render needs. A rollout
//! renders its template twice instead of once.

use crate::review::{read_request, Outcome, Reviewed};
use podwire_core::inject::{InjectorConfig, Labels, Step};
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

/// The start of every answer, up to the uid's value.
const HEAD: &str =
    r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"#;

/// A pod CREATE as the memo keys it.
#[derive(Debug)]
pub struct Request<'a> {
    pub uid: String,
    pub namespace: String,
    name: String,
    object: &'a [u8],
    pub dry_run: bool,
}

impl<'a> Request<'a> {
    /// The request, when `body` is a v1 AdmissionReview of a pod CREATE with a namespace;
    /// `None` for anything else (which then takes the full review, errors included). Read by
    /// review's own reader, the object borrowed as raw JSON (checked, never built as a tree):
    /// the memo reads exactly the bodies a review accepts.
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let r = read_request::<&'a RawValue>(body).ok()?;
        let pod_create = r.kind.group.is_empty()
            && r.kind.kind == "Pod"
            && r.sub_resource.is_empty()
            && r.operation == "CREATE"
            && !r.namespace.is_empty();
        let object = r.object?.get().as_bytes();
        (pod_create && object.len() <= Memo::MAX_OBJECT_BYTES).then(|| Request {
            uid: r.uid,
            namespace: r.namespace,
            name: r.name,
            object,
            dry_run: r.dry_run.unwrap_or(false),
        })
    }
}

/// A remembered answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer's JSON after the uid's value.
    tail: Arc<[u8]>,
    pub outcome: Outcome,
    pub step: Option<Step>,
    pub summary: Arc<str>,
}

impl Answer {
    /// The whole answer for the request with `uid`.
    pub fn body(&self, uid: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD.len() + uid.len() + 2 + self.tail.len());
        out.extend_from_slice(HEAD.as_bytes());
        // A uid is a plain string; serde_json escapes whatever it holds.
        let _ = serde_json::to_writer(&mut out, uid);
        out.extend_from_slice(&self.tail);
        out
    }
}

#[derive(Debug)]
struct Entry {
    object: Box<[u8]>,
    namespace: String,
    name: String,
    labels: Option<Labels>,
    answer: Answer,
}

impl Entry {
    fn size(&self) -> usize {
        let labels = self.labels.iter().flatten().map(|(k, v)| k.len() + v.len());
        self.object.len()
            + self.answer.tail.len()
            + self.answer.summary.len()
            + self.namespace.len()
            + self.name.len()
            + labels.sum::<usize>()
    }
}

#[derive(Debug, Default)]
struct Inner {
    config: Option<Arc<InjectorConfig>>,
    entries: HashMap<u64, Entry>,
    /// Insertion order, for eviction (oldest first).
    order: VecDeque<u64>,
    /// Keys of objects seen once, not kept yet, with the number of their note.
    noted: HashMap<u64, u64>,
    /// Notes in order (key, number), oldest first; a note whose key was kept since or noted
    /// again is stale and only counts towards [`Memo::MAX_NOTED`].
    notes: VecDeque<(u64, u64)>,
    /// Notes taken so far.
    noted_count: u64,
    /// Bytes held by the entries' objects and answers.
    bytes: usize,
}

impl Inner {
    /// Whether the entries are answers under `config`.
    fn holds(&self, config: &Arc<InjectorConfig>) -> bool {
        self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config))
    }

    /// These, emptied first unless they are `config`'s.
    fn for_config(&mut self, config: &Arc<InjectorConfig>) -> &mut Self {
        if !self.holds(config) {
            *self = Inner {
                config: Some(config.clone()),
                ..Inner::default()
            };
        }
        self
    }

    /// Whether the object with `key` was seen before (noted, or kept already); else it is
    /// noted now, the oldest note forgotten past [`Memo::MAX_NOTED`]. Exact, first in first
    /// out: an object seen again within the next `MAX_NOTED` notes is always kept.
    fn seen_before(&mut self, key: u64) -> bool {
        if self.entries.contains_key(&key) || self.noted.remove(&key).is_some() {
            return true;
        }
        if self.notes.len() >= Memo::MAX_NOTED {
            if let Some((old, n)) = self.notes.pop_front() {
                if self.noted.get(&old) == Some(&n) {
                    self.noted.remove(&old);
                }
            }
        }
        self.noted_count += 1;
        self.noted.insert(key, self.noted_count);
        self.notes.push_back((key, self.noted_count));
        false
    }
}

/// The memo: at most [`Memo::MAX_ENTRIES`] answers, oldest evicted first.
#[derive(Debug, Default)]
pub struct Memo {
    inner: Mutex<Inner>,
    hasher: foldhash::quality::RandomState,
}

impl Memo {
    /// Entries kept: a rollout's worth of distinct pod templates.
    pub const MAX_ENTRIES: usize = 256;
    /// Larger pod objects are not kept.
    pub const MAX_OBJECT_BYTES: usize = 16 << 10;
    /// Objects and answers kept, in all: the memo's share of the injector's memory.
    pub const MAX_BYTES: usize = 4 << 20;
    /// Keys of objects seen once that are remembered (~40 bytes each, queue and index): a
    /// second sighting among the last this many distinct objects is kept.
    pub const MAX_NOTED: usize = 1024;

    fn key(&self, r: &Request<'_>) -> u64 {
        self.hasher.hash_one(r.object)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The remembered answer for `r` under `config` and the namespace's `labels`.
    pub fn get(
        &self,
        r: &Request<'_>,
        config: &Arc<InjectorConfig>,
        labels: Option<&Labels>,
    ) -> Option<Answer> {
        let key = self.key(r);
        let inner = self.lock();
        if !inner.holds(config) {
            return None;
        }
        let e = inner.entries.get(&key)?;
        (*e.object == *r.object
            && e.namespace == r.namespace
            && e.name == r.name
            && e.labels.as_ref() == labels)
            .then(|| e.answer.clone())
    }

    /// Remember `reviewed` (serialized as `body`) for `r`; a config other than the one held
    /// empties the memo first. Answers that are not a pod's decision are not kept.
    pub fn put(
        &self,
        r: &Request<'_>,
        config: &Arc<InjectorConfig>,
        labels: Option<Labels>,
        reviewed: &Reviewed,
        body: &[u8],
    ) {
        if !matches!(
            reviewed.outcome,
            Outcome::Injected | Outcome::Skipped | Outcome::Refused
        ) {
            return;
        }
        let Ok(uid) = serde_json::to_string(&r.uid) else {
            return;
        };
        // Only an answer that reads HEAD, this uid, then the rest can be replayed.
        let Some(tail) = body
            .strip_prefix(HEAD.as_bytes())
            .and_then(|b| b.strip_prefix(uid.as_bytes()))
        else {
            return;
        };
        let key = self.key(r);
        if !self.lock().for_config(config).seen_before(key) {
            return;
        }
        let entry = Entry {
            object: r.object.into(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            labels,
            answer: Answer {
                tail: tail.into(),
                outcome: reviewed.outcome,
                step: reviewed.step,
                summary: reviewed.summary.as_str().into(),
            },
        };
        let mut inner = self.lock();
        // Replaced meanwhile: the memo is the new config's now, not this answer's.
        if !inner.holds(config) {
            return;
        }
        inner.bytes += entry.size();
        match inner.entries.insert(key, entry) {
            Some(replaced) => inner.bytes -= replaced.size(),
            None => inner.order.push_back(key),
        }
        while inner.order.len() > Self::MAX_ENTRIES || inner.bytes > Self::MAX_BYTES {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.entries.remove(&old) {
                inner.bytes -= e.size();
            }
        }
    }

    /// Bytes held now (objects and answers).
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::review::review_resolving;
    use podwire_core::MeshProfile;
    use serde_json::{json, Value};
    use std::path::Path;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    fn config() -> Arc<InjectorConfig> {
        let cfg = crate::load_config(&fixtures().join("config.yaml"), &MeshProfile::istio())
            .expect("config")
            .config;
        Arc::new(cfg)
    }

    /// The review as the handler answers it without the memo.
    fn fresh(body: &[u8], cfg: &InjectorConfig, labels: Option<&Labels>) -> (Reviewed, Vec<u8>) {
        let r = review_resolving(body, cfg, &|_| labels.cloned(), &MeshProfile::istio());
        let out = r.review.to_json().expect("JSON");
        (r, out)
    }

    fn with(body: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(body).expect("JSON");
        f(&mut v);
        serde_json::to_vec(&v).expect("JSON")
    }

    #[test]
    fn a_replica_gets_the_fresh_answer_with_its_own_uid() {
        let cfg = config();
        let mut outcomes = Vec::new();
        for entry in std::fs::read_dir(fixtures()).expect("fixtures") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let original = std::fs::read(&path).expect("fixture");
            if serde_json::from_slice::<Value>(&original).is_err() {
                continue; // malformed.json: never read by the memo, see below
            }
            let first = with(&original, |v| v["request"]["uid"] = json!("first"));
            let Some(r) = Request::read(&first) else {
                continue; // not a namespaced pod CREATE: never kept
            };
            // A memo of its own: fixtures may share a pod object (dry-run.json).
            let memo = Memo::default();
            let (reviewed, out) = fresh(&first, &cfg, None);
            memo.put(&r, &cfg, None, &reviewed, &out);
            // Seen once: only noted. The second replica is reviewed afresh, and kept.
            let second = with(&original, |v| v["request"]["uid"] = json!("second"));
            let r2 = Request::read(&second).expect("same shape");
            assert!(memo.get(&r2, &cfg, None).is_none(), "{}", path.display());
            let (reviewed, out) = fresh(&second, &cfg, None);
            memo.put(&r2, &cfg, None, &reviewed, &out);
            let third = with(&original, |v| v["request"]["uid"] = json!("third \"3\""));
            let r2 = Request::read(&third).expect("same shape");
            let (want, want_out) = fresh(&third, &cfg, None);
            match memo.get(&r2, &cfg, None) {
                Some(hit) => {
                    assert_eq!(
                        String::from_utf8_lossy(&hit.body(&r2.uid)),
                        String::from_utf8_lossy(&want_out),
                        "{}",
                        path.display()
                    );
                    assert_eq!((hit.outcome, hit.step), (want.outcome, want.step));
                    assert_eq!(&*hit.summary, want.summary);
                    outcomes.push(hit.outcome);
                }
                None => assert!(
                    !matches!(
                        want.outcome,
                        Outcome::Injected | Outcome::Skipped | Outcome::Refused
                    ),
                    "{}: a {:?} answer was not kept",
                    path.display(),
                    want.outcome
                ),
            }
        }
        let malformed = std::fs::read(fixtures().join("malformed.json")).expect("fixture");
        assert!(Request::read(&malformed).is_none());
        for o in [Outcome::Injected, Outcome::Skipped, Outcome::Refused] {
            assert!(
                outcomes.contains(&o),
                "no fixture answered {o:?} from the memo"
            );
        }
    }

    #[test]
    fn anything_the_answer_depends_on_misses() {
        let cfg = config();
        let memo = Memo::default();
        let body = std::fs::read(fixtures().join("controller-pod.json")).expect("fixture");
        let r = Request::read(&body).expect("a pod CREATE");
        let (reviewed, out) = fresh(&body, &cfg, None);
        memo.put(&r, &cfg, None, &reviewed, &out);
        memo.put(&r, &cfg, None, &reviewed, &out);
        assert!(memo.get(&r, &cfg, None).is_some());
        // Other namespace labels.
        let labels = Labels::from([("istio-injection".to_string(), "disabled".to_string())]);
        assert!(memo.get(&r, &cfg, Some(&labels)).is_none());
        // Another config (even an equal one: configs are told apart by identity).
        assert!(memo.get(&r, &Arc::new((*cfg).clone()), None).is_none());
        // One byte of the pod, the namespace, the name.
        for changed in [
            with(&body, |v| {
                v["request"]["object"]["metadata"]["labels"]["app"] = json!("other")
            }),
            with(&body, |v| v["request"]["namespace"] = json!("other")),
            with(&body, |v| v["request"]["name"] = json!("other")),
        ] {
            let r2 = Request::read(&changed).expect("a pod CREATE");
            assert!(memo.get(&r2, &cfg, None).is_none(), "{:?}", r2);
        }
        // Not a pod CREATE at all: not even read.
        for other in [
            with(&body, |v| v["request"]["operation"] = json!("UPDATE")),
            with(&body, |v| v["request"]["subResource"] = json!("status")),
            with(&body, |v| {
                v["request"]["kind"]["kind"] = json!("Deployment")
            }),
            with(&body, |v| {
                v["apiVersion"] = json!("admission.k8s.io/v1beta1")
            }),
            with(&body, |v| v["request"]["namespace"] = json!("")),
        ] {
            assert!(Request::read(&other).is_none());
        }
        // Fields review checks by type, though the answer does not use them: a body it finds
        // malformed is not read here either.
        for malformed in [
            with(&body, |v| v["request"]["resource"] = json!("pods")),
            with(&body, |v| v["request"]["kind"]["version"] = json!(1)),
        ] {
            assert!(Request::read(&malformed).is_none());
            let fresh = review_resolving(&malformed, &cfg, &|_| None, &MeshProfile::istio());
            assert_eq!(fresh.outcome, Outcome::Malformed);
        }
        // A new config empties the memo, notes included: a pod noted under the old config is
        // a first sighting under the new one.
        let noted = with(&body, |v| {
            v["request"]["object"]["metadata"]["labels"]["noted"] = json!("once")
        });
        let rn = Request::read(&noted).expect("a pod CREATE");
        let (noted_reviewed, noted_out) = fresh(&noted, &cfg, None);
        memo.put(&rn, &cfg, None, &noted_reviewed, &noted_out);
        let other_cfg = Arc::new((*cfg).clone());
        memo.put(&r, &other_cfg, None, &reviewed, &out);
        memo.put(&rn, &other_cfg, None, &noted_reviewed, &noted_out);
        assert_eq!(memo.len(), 0);
        assert!(memo.get(&r, &cfg, None).is_none());
        memo.put(&r, &other_cfg, None, &reviewed, &out);
        assert_eq!(memo.len(), 1);
        assert!(memo.get(&r, &cfg, None).is_none());
        assert!(memo.get(&r, &other_cfg, None).is_some());
        assert!(memo.get(&rn, &other_cfg, None).is_none());
    }

    #[test]
    fn the_memo_stays_within_its_bounds() {
        let cfg = config();
        let memo = Memo::default();
        let body = std::fs::read(fixtures().join("controller-pod.json")).expect("fixture");
        let n = Memo::MAX_ENTRIES + 40;
        for i in 0..n {
            let b = with(&body, |v| {
                v["request"]["object"]["metadata"]["labels"]["i"] = json!(i.to_string())
            });
            let r = Request::read(&b).expect("a pod CREATE");
            let (reviewed, out) = fresh(&b, &cfg, None);
            // Twice: a pod seen once is only noted.
            memo.put(&r, &cfg, None, &reviewed, &out);
            memo.put(&r, &cfg, None, &reviewed, &out);
        }
        assert!(memo.len() <= Memo::MAX_ENTRIES, "{}", memo.len());
        assert!(memo.bytes() <= Memo::MAX_BYTES, "{}", memo.bytes());
        // The newest is kept, the oldest went.
        let probe = |i: usize| {
            let b = with(&body, |v| {
                v["request"]["object"]["metadata"]["labels"]["i"] = json!(i.to_string())
            });
            let r = Request::read(&b).expect("a pod CREATE");
            memo.get(&r, &cfg, None).is_some()
        };
        assert!(probe(n - 1));
        assert!(!probe(0));
    }

    #[test]
    fn pods_seen_once_are_noted_not_kept() {
        let cfg = config();
        let memo = Memo::default();
        let body = std::fs::read(fixtures().join("controller-pod.json")).expect("fixture");
        let pod = |i: usize| {
            with(&body, |v| {
                v["request"]["object"]["metadata"]["labels"]["i"] = json!(i.to_string())
            })
        };
        // One answer for all (the same uid): what is kept does not matter here, only whether.
        let (reviewed, out) = fresh(&body, &cfg, None);
        let put = |b: &[u8]| {
            let r = Request::read(b).expect("a pod CREATE");
            memo.put(&r, &cfg, None, &reviewed, &out);
            memo.get(&r, &cfg, None).is_some()
        };
        // Distinct pods, each seen once: not one copy kept, and the notes stay bounded.
        let n = 3 * Memo::MAX_NOTED;
        for i in 0..n {
            assert!(!put(&pod(i)), "pod {i} was kept on its first sighting");
        }
        assert_eq!((memo.len(), memo.bytes()), (0, 0));
        {
            let inner = memo.lock();
            assert!(
                inner.notes.len() <= Memo::MAX_NOTED,
                "{}",
                inner.notes.len()
            );
            assert!(
                inner.noted.len() <= Memo::MAX_NOTED,
                "{}",
                inner.noted.len()
            );
        }
        // Seen again among the last MAX_NOTED notes: kept. Noted longer ago: noted afresh.
        assert!(put(&pod(n - Memo::MAX_NOTED)));
        assert!(!put(&pod(n - Memo::MAX_NOTED - 1)));
        assert!(put(&pod(n - Memo::MAX_NOTED - 1)));
        assert_eq!(memo.len(), 2);
    }
}
