//! The inner dockerd's MTU (envbox#167): a workspace's dockerd defaults to MTU 1500 for its
//! bridge, which hangs TLS (e.g. in `docker build`) when the pod's MTU is smaller. envbox
//! gives it the pod's MTU through `/etc/docker/daemon.json` without changing the image:
//! the new file goes into the workspace's fresh overlay upper layer, and an existing file
//! from the image is never rewritten.

use serde_json::Value;

/// Path of dockerd's configuration inside the workspace.
pub const DAEMON_JSON_PATH: &str = "/etc/docker/daemon.json";

/// What to do about the workspace's `/etc/docker/daemon.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonJsonDecision {
    /// The image has none: write this content (`{"mtu": N}`).
    Write(String),
    /// The image's file already sets an MTU that fits the pod: leave it alone.
    Keep,
    /// Leave the image's file alone, and show the user this warning.
    KeepWithWarning(String),
}

/// Decides from the image's `/etc/docker/daemon.json` (`None` when it has none) and the
/// pod's MTU.
pub fn inner_docker_daemon_json(existing: Option<&str>, mtu: u32) -> DaemonJsonDecision {
    let Some(text) = existing else {
        let mut content = serde_json::json!({ "mtu": mtu }).to_string();
        content.push('\n');
        return DaemonJsonDecision::Write(content);
    };
    let add_hint = format!("add \"mtu\": {mtu} to {DAEMON_JSON_PATH} in the image");
    let parsed: Result<Value, _> = serde_json::from_str(text);
    let obj = match parsed {
        Ok(Value::Object(obj)) => obj,
        Ok(_) | Err(_) if text.trim().is_empty() => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is empty, so Docker inside the workspace uses \
                 MTU 1500 while the pod's network has MTU {mtu}; connections from inner \
                 containers may hang. To fix it, {add_hint}."
            ))
        }
        Ok(_) => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is not a JSON object; dockerd may refuse to \
                 start. Left unchanged; also {add_hint}."
            ))
        }
        Err(e) => {
            return DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image is not valid JSON ({e}); dockerd may refuse \
                 to start. Left unchanged; also {add_hint}."
            ))
        }
    };
    match obj.get("mtu") {
        None => DaemonJsonDecision::KeepWithWarning(format!(
            "{DAEMON_JSON_PATH} in the image sets no \"mtu\", so Docker inside the workspace \
             uses MTU 1500 while the pod's network has MTU {mtu}; connections from inner \
             containers (e.g. TLS in docker build) may hang. To fix it, {add_hint}."
        )),
        Some(v) => match v.as_u64() {
            Some(set) if set > u64::from(mtu) => DaemonJsonDecision::KeepWithWarning(format!(
                "{DAEMON_JSON_PATH} in the image sets \"mtu\": {set}, more than the pod \
                 network's MTU {mtu}; connections from inner containers may hang. Set \"mtu\": \
                 {mtu} or lower."
            )),
            _ => DaemonJsonDecision::Keep,
        },
    }
}
