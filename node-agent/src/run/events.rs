//! Events through kube-rs' `Recorder` (events.k8s.io/v1, repeats folded into a series), on the
//! pod a repair acted on or on this Node, so `kubectl describe` shows them.

use super::{api_call, API_TIMEOUT};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tracing::warn;

pub struct Events {
    recorder: Recorder,
    client: Client,
}

impl Events {
    pub fn new(client: Client, node: &str) -> Events {
        let reporter = Reporter {
            controller: podwire_core::node::AGENT_DAEMONSET.into(),
            instance: Some(node.to_string()),
        };
        Events {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// A Warning on `pod`. Failures are logged: an Event is never worth failing a repair for.
    pub async fn on_pod(&self, pod: &Pod, action: &str, reason: &str, note: &str) {
        self.publish(pod.object_ref(&()), action, reason, note)
            .await;
    }

    /// A Warning on this Node (its real object reference, read from the API server).
    pub async fn on_node(&self, node: &str, action: &str, reason: &str, note: &str) {
        let nodes: Api<Node> = Api::all(self.client.clone());
        match api_call(&format!("GET node {node}"), nodes.get(node)).await {
            Ok(n) => self.publish(n.object_ref(&()), action, reason, note).await,
            Err(e) => warn!("recording Event {reason} on node {node}: {e}"),
        }
    }

    async fn publish(&self, regarding: ObjectReference, action: &str, reason: &str, note: &str) {
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            // The API server refuses notes over 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        let who = format!(
            "{} {}",
            regarding.kind.as_deref().unwrap_or("object"),
            regarding.name.as_deref().unwrap_or("?")
        );
        match tokio::time::timeout(API_TIMEOUT, self.recorder.publish(&ev, &regarding)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("recording Event {reason} on {who}: {e}"),
            Err(_) => warn!("recording Event {reason} on {who}: no answer within {API_TIMEOUT:?}"),
        }
    }
}
