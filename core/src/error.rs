use thiserror::Error;

/// Everything that can go wrong while turning a pod into rules.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A `traffic.sidecar.istio.io/*` (or similar) annotation holds a value podwire refuses to render.
    #[error(
        "annotation {key}={value:?} is invalid: {reason}; fix or remove the annotation on the pod"
    )]
    InvalidAnnotation {
        key: String,
        value: String,
        reason: String,
    },
    /// The proxy container's securityContext has an unusable uid/gid.
    #[error("container {container}: securityContext.{field} = {value} is not usable as the proxy's owner match: {reason}")]
    InvalidOwner {
        container: String,
        field: &'static str,
        value: i64,
        reason: &'static str,
    },
    /// The injector's configuration file holds a value podwire refuses to use.
    #[error("injector config: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// The object handed to the injector is not a readable Pod (or pod template).
    #[error("not a readable pod: {reason}")]
    InvalidPod { reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line, each cause shown once: a cause whose text the message
/// already holds (an error enum that prints `{source}` and also returns it as its source) is
/// not repeated. What the binaries print at their edge.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct Wrapped {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("starting the agent")]
    struct Context(#[source] Wrapped);

    #[test]
    fn each_cause_is_shown_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let e = Context(Wrapped {
            path: "/x",
            source: io,
        });
        let r = report(&e);
        assert_eq!(r, format!("starting the agent: reading /x: {io_text}"));
        assert_eq!(r.matches(&io_text).count(), 1, "{r}");
    }
}
