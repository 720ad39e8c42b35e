//! Finding the pod: the node agent's Unix socket first (a node-local cache, microseconds).
//! Synchronous std I/O with short timeouts: no async runtime on the ADD path.

use crate::env::PodRef;
use podwire_core::lookup::{
    LookupRequest, LookupResponse, LookupStatus, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use podwire_core::PodInfo;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// The answer of the pod source.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<PodInfo>),
    /// The source is synced and has no such pod: not a pod podwire manages.
    NotFound,
}

/// Ask the agent. `Err` is a reason why the answer is unknown (agent down, not synced, ...).
pub fn ask_agent(socket: &Path, pod: &PodRef) -> Result<Lookup, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to the agent at {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| format!("agent socket: {e}"))?;
    let req = LookupRequest {
        v: PROTOCOL_VERSION,
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| format!("encoding request: {e}"))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("sending the look-up to the agent: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream.take(MAX_MESSAGE_BYTES as u64))
        .read_line(&mut answer)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    let resp: LookupResponse = serde_json::from_str(&answer)
        .map_err(|e| format!("the agent's answer is not valid: {e}"))?;
    if resp.v != PROTOCOL_VERSION {
        return Err(format!(
            "the agent speaks look-up protocol v{}, this plugin v{PROTOCOL_VERSION}: upgrade them together",
            resp.v
        ));
    }
    match resp.status {
        LookupStatus::Found { pod } => Ok(Lookup::Found(pod)),
        LookupStatus::NotFound => Ok(Lookup::NotFound),
        LookupStatus::NotReady { message } => Err(format!("the agent is not ready: {message}")),
        LookupStatus::Error { message } => Err(format!("the agent answered an error: {message}")),
    }
}
