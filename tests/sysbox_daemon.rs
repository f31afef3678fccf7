//! The sysbox daemon start-up logic against stand-in daemons (real processes, no sysbox needed): an
//! early exit is diagnosed, a start that never becomes ready is retried and then reported, and a
//! daemon that listens on its socket is accepted. Its own test binary, because the reaper below waits
//! for any child of the process.

use std::sync::Arc;
use std::time::Duration;

use envbox::pid1::supervisor::{Exit, Supervisor};
use envbox::runtime::sysbox::{start_daemon, DaemonSpec, SysboxError, SysboxOptions, MAX_STARTS};

fn write_daemon(dir: &std::path::Path, body: &str) {
    let p = dir.join("sysbox-mgr");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn readiness_restart_and_early_exit() {
    let sup = Supervisor::new(Arc::new(envbox::sys::real::RealProcessOps));
    let reaper = Arc::clone(&sup);
    std::thread::spawn(move || loop {
        reaper.reap();
        std::thread::sleep(Duration::from_millis(10));
    });
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mgr.sock");
    let spec = DaemonSpec {
        name: "sysbox-mgr",
        args: vec![],
        socket: socket.clone(),
        ready_within: Duration::from_millis(400),
    };
    let opts = SysboxOptions {
        bin_dir: Some(dir.path().to_path_buf()),
        disable_idmapped_mount: false,
        oom_score_adj: None,
    };

    write_daemon(
        dir.path(),
        "echo 'msg=\"mount: operation not permitted\"' >&2\nexit 3",
    );
    let err = start_daemon(&sup, &opts, &spec, &|_| {}, &|| false)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            SysboxError::EarlyExit {
                exit: Exit::Code(3),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("privileged"), "{err}");

    write_daemon(dir.path(), "exec sleep 30");
    let said = std::sync::Mutex::new(Vec::new());
    let err = start_daemon(
        &sup,
        &opts,
        &spec,
        &|m| said.lock().unwrap().push(m.to_string()),
        &|| false,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            err,
            SysboxError::NotReady {
                attempts: MAX_STARTS,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(said.lock().unwrap().len() as u32, MAX_STARTS - 1);

    let py = format!(
        "exec python3 -c 'import socket,time; s=socket.socket(socket.AF_UNIX); s.bind(\"{}\"); s.listen(); time.sleep(30)'",
        socket.display()
    );
    write_daemon(dir.path(), &py);
    // A loaded CI machine may take a while to start python; readiness is what is tested here.
    let patient = DaemonSpec {
        ready_within: Duration::from_secs(15),
        ..spec
    };
    let d = start_daemon(&sup, &opts, &patient, &|_| {}, &|| false).unwrap();
    assert!(d.pid > 0);
    unsafe { libc::kill(-d.pid, libc::SIGKILL) };
}
