//! Finding the pod: the node agent's Unix socket first (a node-local cache, microseconds).
//! Synchronous std I/O with short timeouts: no async runtime on the ADD path.

use crate::env::PodRef;
use podwire_core::lookup::{LookupResponse, LookupStatus, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use podwire_core::PodInfo;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// For the whole look-up (connect aside): an agent that answers a byte at a time must not
/// hold ADD past it.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's stream, each read given what is left of the look-up's time.
struct Deadline {
    stream: UnixStream,
    until: Instant,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no whole answer within {} s", TIMEOUT.as_secs()),
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

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
    let mut line =
        serde_json::to_vec(&pod.request()).map_err(|e| format!("encoding request: {e}"))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("sending the look-up to the agent: {e}"))?;
    let mut answer = String::new();
    let deadline = Deadline {
        stream,
        until: Instant::now() + TIMEOUT,
    };
    BufReader::new(deadline.take(MAX_MESSAGE_BYTES as u64))
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            // A socket read timeout says "would block".
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "the agent gave no whole answer within {} s",
                TIMEOUT.as_secs()
            ),
            _ => format!("reading the agent's answer: {e}"),
        })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// An agent that answers a byte every 100 ms, a valid "found" after 4 s of blanks: the
    /// look-up gives up at its 2 s, whatever each single read takes.
    #[test]
    fn a_trickling_agent_does_not_hold_the_look_up() {
        let dir = tempfile::tempdir().expect("tmp");
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let agent = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(conn.try_clone().expect("clone"))
                .read_line(&mut line)
                .expect("request");
            for _ in 0..40 {
                if conn.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = conn.write_all(
                b"{\"v\":1,\"status\":\"found\",\"pod\":{\"metadata\":{\"name\":\"p\"}}}\n",
            );
        });
        let pod = PodRef {
            namespace: "default".into(),
            name: "p".into(),
            uid: String::new(),
        };
        match ask_agent(&socket, &pod) {
            Err(e) => assert!(e.contains("within 2 s"), "{e}"),
            Ok(found) => panic!("waited past the deadline for {found:?}"),
        }
        agent.join().expect("agent thread");
    }
}
