//! `podwire doctor`: the troubleshooting checks of the injection documents, run against a
//! cluster through the kube client, each with what was found and what to do.

mod certs;
mod checks;
mod fetch;
mod pss;
mod rbac;

use crate::manifest::template_pointer;
use crate::manifest::{documents, read_input};
use checks::{Check, Inputs, Status, Subject};
use fetch::{Cluster, Fetched};
use podwire_core::MeshProfile;
use serde::Serialize;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;

const AFTER_HELP: &str = "\
Checks, in the order of Istio's \"Sidecar Injection Problems\" page:
  system-namespace, host-network, namespace-selector, default-policy, pod-annotation,
  ca-bundle, injector-endpoints, cert-expiry, webhook-failure-policy, apiserver-proxy,
  node-agent, resource-quota, pod-security, rbac

Each is pass (✔), fail (✘) or could not check (?): a check whose input cannot be read
(not found, forbidden, API server down) says so with the error and never stops the others.

Exit status:
  0  nothing failed. Checks that could not run do NOT count as failures (the report says
     \"could not check\" for each, and the summary counts them): a partial view of the
     cluster is not evidence of a problem. Scripts that need every check to have run
     should read `-o json` and test summary.unknown == 0.
  1  at least one check failed.
  2  usage error (bad arguments, an unreadable -f file, no Pod or pod template in it).";

#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct Args {
    /// Namespace of the pod (and of the checks that are per namespace); default: the -f
    /// manifest's namespace, else `default`.
    #[arg(short = 'n', long, value_name = "NS")]
    namespace: Option<String>,
    /// Check this pod, read from the cluster.
    #[arg(long, value_name = "NAME", conflicts_with = "file")]
    pod: Option<String>,
    /// Check the Pod or the pod template of the workload (Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, ReplicationController, Job, CronJob) in this manifest; `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Format,
    /// Kubeconfig file; default: KUBECONFIG, ~/.kube/config, or in-cluster.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Serialize)]
struct Summary {
    pass: usize,
    fail: usize,
    unknown: usize,
    /// `fail` when something failed, `incomplete` when nothing failed but some checks could
    /// not run, `pass` otherwise.
    result: &'static str,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    namespace: &'a str,
    /// Set when no client could be made (no kubeconfig, unreadable file).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_error: Option<&'a str>,
    subject: Option<String>,
    checks: &'a [Check],
    summary: Summary,
}

/// The first Pod or workload in the manifest, as JSON (`kind: List` items included).
fn first_object(docs: Vec<serde_yaml_ng::Value>) -> Result<(Value, usize), String> {
    let mut found: Vec<Value> = Vec::new();
    for doc in docs {
        let v =
            serde_json::to_value(&doc).map_err(|e| format!("not representable as JSON: {e}"))?;
        let items = if v.get("kind").and_then(Value::as_str) == Some("List") {
            v.get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        } else {
            vec![v]
        };
        found.extend(items.into_iter().filter(|i| {
            i.get("kind")
                .and_then(Value::as_str)
                .and_then(template_pointer)
                .is_some()
        }));
    }
    let n = found.len();
    found
        .into_iter()
        .next()
        .map(|v| (v, n))
        .ok_or_else(|| "no Pod or pod template (Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob) in it".into())
}

/// The subject from `-f`, and its namespace. Errors are usage errors.
fn subject_from_file(file: &str, namespace: Option<&str>) -> Result<(Subject, String), String> {
    let text = read_input(file).map_err(|e| podwire_core::error::report(e.as_ref()))?;
    let docs = documents(&text, file).map_err(|e| podwire_core::error::report(e.as_ref()))?;
    let (obj, n) = first_object(docs).map_err(|e| format!("{file}: {e}"))?;
    if n > 1 {
        eprintln!("podwire: note: {file} holds {n} pods/workloads; checking the first");
    }
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let meta = obj.get("metadata").cloned().unwrap_or(Value::Null);
    let field = |f: &str| {
        meta.get(f)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let ns = match (field("namespace"), namespace) {
        (own, Some(flag)) if !own.is_empty() && own != flag => {
            return Err(format!(
                "{file}: {kind} is in namespace {own}, but --namespace says {flag}"
            ))
        }
        (own, _) if !own.is_empty() => own,
        (_, Some(flag)) => flag.to_string(),
        _ => "default".to_string(),
    };
    let name = match (field("name"), field("generateName")) {
        (n, _) if !n.is_empty() => n,
        (_, g) => format!("{g}<generated>"),
    };
    let pointer = template_pointer(&kind).unwrap_or("");
    let mut pod = obj
        .pointer(pointer)
        .cloned()
        .ok_or_else(|| format!("{file}: {kind} {ns}/{name} has no pod template"))?;
    // The template's pods are created in the workload's namespace.
    if let Some(m) = pod.as_object_mut() {
        let md = m
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(md) = md.as_object_mut() {
            md.insert("namespace".into(), Value::String(ns.clone()));
        }
    }
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    Ok((
        Subject {
            source: format!("{kind} {ns}/{name} (from {file})"),
            workload_meta: (kind != "Pod").then_some(meta),
            kind,
            name,
            pod,
            node,
        },
        ns,
    ))
}

fn subject_from_pod(pod: Value, namespace: &str, name: &str) -> Subject {
    let node = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    Subject {
        source: format!("Pod {namespace}/{name}"),
        kind: "Pod".into(),
        name: name.to_string(),
        pod,
        workload_meta: None,
        node,
    }
}

/// What was read: the namespace, the subject, the cluster, and why there is no client at all
/// (said once, rather than in every check).
type Gathered = (String, Fetched<Option<Subject>>, Cluster, Option<String>);

async fn gather(args: &Args, file_subject: Option<(Subject, String)>) -> Gathered {
    let (namespace, mut subject) = match file_subject {
        Some((s, ns)) => (ns, Ok(Some(s))),
        None => (
            args.namespace.clone().unwrap_or_else(|| "default".into()),
            Ok(None),
        ),
    };
    let client = match fetch::client(args.kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            let short = "no Kubernetes client (see cluster_error)";
            if let Some(name) = &args.pod {
                subject = Err(format!("pod {namespace}/{name}: {short}"));
            }
            return (namespace, subject, Cluster::unreachable(short), Some(e));
        }
    };
    if let Some(name) = &args.pod {
        subject = fetch::pod(&client, &namespace, name)
            .await
            .map(|p| Some(subject_from_pod(p, &namespace, name)));
    }
    let node = match &subject {
        Ok(Some(s)) => s.node.clone(),
        _ => None,
    };
    let cluster = Cluster::read(&client, &namespace, node.as_deref()).await;
    (namespace, subject, cluster, None)
}

fn print_text(
    namespace: &str,
    subject: &Fetched<Option<Subject>>,
    cluster_error: Option<&str>,
    checks: &[Check],
    s: &Summary,
) {
    let what = match subject {
        Ok(Some(sub)) => sub.source.clone(),
        Ok(None) => "no pod given".to_string(),
        Err(e) => format!("pod not readable: {e}"),
    };
    println!("podwire doctor: namespace {namespace}, {what}");
    if let Some(e) = cluster_error {
        println!("cluster_error: {e}");
    }
    for c in checks {
        let mark = match c.status {
            Status::Pass => "✔",
            Status::Fail => "✘",
            Status::Unknown => "?",
        };
        println!("{mark} {}: {}", c.id, c.title);
        for line in c.evidence.lines() {
            println!("    {line}");
        }
        if let Some(fix) = &c.fix {
            let mut lines = fix.lines();
            if let Some(first) = lines.next() {
                println!("    fix: {first}");
            }
            for l in lines {
                println!("         {l}");
            }
        }
    }
    println!(
        "{} passed, {} failed, {} could not check",
        s.pass, s.fail, s.unknown
    );
    if s.fail == 0 && s.unknown > 0 {
        println!(
            "nothing failed, but {} check(s) could not be run (see \"could not check\" above)",
            s.unknown
        );
    }
}

/// `podwire doctor`: exit 0 nothing failed, 1 something failed, 2 usage error.
pub fn main(args: &Args) -> ExitCode {
    let file_subject = match &args.file {
        Some(f) => match subject_from_file(f, args.namespace.as_deref()) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("podwire: error: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("podwire: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (namespace, subject, cluster, cluster_error) = runtime.block_on(gather(args, file_subject));
    let profile = MeshProfile::istio();
    let checks = checks::run(&Inputs {
        namespace: &namespace,
        subject: &subject,
        cluster: &cluster,
        profile: &profile,
        now: certs::now_unix(),
    });
    let count = |st: Status| checks.iter().filter(|c| c.status == st).count();
    let summary = Summary {
        pass: count(Status::Pass),
        fail: count(Status::Fail),
        unknown: count(Status::Unknown),
        result: match (count(Status::Fail), count(Status::Unknown)) {
            (0, 0) => "pass",
            (0, _) => "incomplete",
            _ => "fail",
        },
    };
    let failed = summary.fail > 0;
    match args.output {
        Format::Text => print_text(
            &namespace,
            &subject,
            cluster_error.as_deref(),
            &checks,
            &summary,
        ),
        Format::Json => {
            let report = Report {
                namespace: &namespace,
                cluster_error: cluster_error.as_deref(),
                subject: match &subject {
                    Ok(Some(s)) => Some(s.source.clone()),
                    _ => None,
                },
                checks: &checks,
                summary,
            };
            match serde_json::to_string_pretty(&report) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("podwire: error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
