//! `envbox exec`: a command inside the running workspace, for `kubectl exec` into the pod.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use oci_spec::runtime::Spec;

use crate::bundle::env;
use crate::cli::ExecArgs;
use crate::config::{RuntimeKind, DEFAULT_STATE_DIR};
use crate::image::facts::{lookup_user, UserInfo};
use crate::workspace::{process_spec, WorkspaceRecord};

pub fn run(a: &ExecArgs) -> ExitCode {
    match exec(a) {
        Ok(never) => match never {},
        Err(msg) => {
            eprintln!("envbox exec: {msg}");
            ExitCode::from(1)
        }
    }
}

enum Never {}

fn exec(a: &ExecArgs) -> Result<Never, String> {
    join_pod_leaf();
    let state_dir = a
        .state_dir
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let rec = WorkspaceRecord::load(&state_dir).map_err(|e| e.to_string())?;
    let spec_path = rec.bundle.join("config.json");
    let spec = Spec::load(&spec_path).map_err(|e| format!("{}: {e}", spec_path.display()))?;
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    let user = match a.user.as_deref() {
        None => rec.user.clone().into(),
        Some(u) => resolve_user(&rootfs, u)?,
    };
    let mut envv = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    env::set(&mut envv, "HOME", &user.home);
    env::set(&mut envv, "USER", &user.name);
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env::set(&mut envv, k, v),
            _ => return Err(format!("--env {kv:?}: expected KEY=VALUE")),
        }
    }
    let args = if a.command.is_empty() {
        vec![if user.shell.is_empty() {
            "/bin/sh".to_string()
        } else {
            user.shell.clone()
        }]
    } else {
        a.command.clone()
    };
    let tty =
        rustix::termios::isatty(std::io::stdin()) && rustix::termios::isatty(std::io::stdout());
    let cwd = match a.workdir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) if w.starts_with('/') => w.to_string(),
        Some(w) => return Err(format!("--workdir {w:?}: expected an absolute path")),
        None if user.home.is_empty() => "/".to_string(),
        None => user.home.clone(),
    };
    let process = process_spec(&user, envv, args, &cwd, tty).map_err(|e| e.to_string())?;
    // The process description carries the agent token: it goes through an anonymous memory file,
    // never the command line or the disk.
    let fd = rustix::fs::memfd_create("envbox-exec-process", rustix::fs::MemfdFlags::empty())
        .map_err(|e| format!("memfd_create: {e}"))?;
    let json = serde_json::to_vec(&process).map_err(|e| e.to_string())?;
    rustix::io::write(&fd, &json).map_err(|e| format!("writing the process description: {e}"))?;
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut cmd = std::process::Command::new(&rec.runtime);
    cmd.arg("--root")
        .arg(&rec.runtime_root)
        .arg("exec")
        .arg("--process")
        .arg(&proc_path);
    if tty {
        cmd.arg("--tty");
    }
    cmd.arg(&rec.id);
    crate::pid1::supervisor::reset_signal_mask(&mut cmd);
    // The same view of the cgroup hierarchies as the runtime had when envbox created the workspace.
    if crate::runtime::oci::host_hides_unified_cgroup(runtime_kind(&rec.runtime)) {
        crate::runtime::oci::hide_unified_cgroup(&mut cmd);
    }
    let err = cmd.exec();
    Err(format!("running {}: {err}", rec.runtime))
}

/// The runtime's kind from its file name, as CODER_RUNTIME names it (sysbox-runc, runc, crun).
fn runtime_kind(binary: &str) -> RuntimeKind {
    let file = std::path::Path::new(binary)
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or_default();
    if file.starts_with("sysbox-runc") {
        RuntimeKind::SysboxRunc
    } else if file.starts_with("crun") {
        RuntimeKind::Crun
    } else {
        RuntimeKind::Runc
    }
}

/// `name`, `uid` or `uid:gid`; names are looked up in the workspace image's own /etc/passwd.
fn resolve_user(rootfs: &std::path::Path, u: &str) -> Result<UserInfo, String> {
    let (first, gid) = match u.split_once(':') {
        Some((a, b)) => (
            a,
            Some(
                b.parse::<u32>()
                    .map_err(|_| format!("--user {u:?}: the group must be numeric"))?,
            ),
        ),
        None => (u, None),
    };
    let mut info = lookup_user(rootfs, first).or_else(|e| match first.parse::<u32>() {
        Ok(uid) => Ok(UserInfo {
            name: first.into(),
            uid,
            gid: uid,
            home: "/".into(),
            shell: "/bin/sh".into(),
            group: None,
            additional_gids: Vec::new(),
        }),
        Err(_) => Err(e.to_string()),
    })?;
    if let Some(g) = gid {
        info.gid = g;
    }
    Ok(info)
}

/// See [`crate::cgroup::join_pod_leaf`]; a failure only costs the explicit placement.
fn join_pod_leaf() {
    use crate::cgroup;
    let root = std::path::Path::new(cgroup::CGROUP_ROOT);
    if crate::sys::fs_kind(root) != Some(crate::sys::FsKind::Cgroup2) {
        return;
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(own) = cgroup::own_v2_cgroup(&own) {
        if let Err(e) = cgroup::join_pod_leaf(&crate::sys::real::RealKernel, root, own) {
            eprintln!(
                "envbox exec: cannot move into the pod's cgroup {}: {e}",
                cgroup::POD_LEAF
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_kind_from_the_recorded_binary() {
        assert_eq!(runtime_kind("/usr/bin/crun"), RuntimeKind::Crun);
        assert_eq!(runtime_kind("/usr/sbin/runc"), RuntimeKind::Runc);
        assert_eq!(
            runtime_kind("/usr/bin/sysbox-runc"),
            RuntimeKind::SysboxRunc
        );
    }
}
