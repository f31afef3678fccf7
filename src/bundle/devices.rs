//! TUN and FUSE nodes for the workspace, made with mknod in the pod (mknod is refused inside a user
//! namespace) and owned by the workspace's root so they do not show as `nobody` inside.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::bundle::spec::{DeviceBind, DeviceNode, FUSE, ID_MAP_HOST_START, TUN};
use crate::sys::{Kernel, NodeKind};

#[derive(Debug, thiserror::Error)]
#[error("creating device node {path} for {inside}: {source}")]
pub struct DeviceError {
    pub path: String,
    pub inside: &'static str,
    pub source: std::io::Error,
}

/// Creates (or re-uses, on a restart) the requested nodes under `dir`.
pub fn prepare(
    kernel: &dyn Kernel,
    dir: &Path,
    add_tun: bool,
    add_fuse: bool,
) -> Result<Vec<DeviceBind>, DeviceError> {
    let mut out = Vec::new();
    for (wanted, node, name) in [(add_tun, TUN, "tun"), (add_fuse, FUSE, "fuse")] {
        if !wanted {
            continue;
        }
        let path = dir.join(name);
        let err = |source| DeviceError {
            path: path.display().to_string(),
            inside: node.path,
            source,
        };
        kernel.create_dir_all(dir).map_err(err)?;
        ensure_node(kernel, &path, node).map_err(err)?;
        kernel
            .chown(&path, ID_MAP_HOST_START, ID_MAP_HOST_START)
            .map_err(err)?;
        kernel.chmod(&path, 0o666).map_err(err)?;
        out.push(DeviceBind {
            node,
            host_path: path,
        });
    }
    Ok(out)
}

/// A node left by an earlier start is kept when it is the right device (the Go envbox failed here
/// with EEXIST), replaced when it is anything else.
fn ensure_node(kernel: &dyn Kernel, path: &Path, node: DeviceNode) -> std::io::Result<()> {
    let want = libc::makedev(node.major as u32, node.minor as u32);
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_char_device() && md.rdev() == want {
            return Ok(());
        }
        std::fs::remove_file(path)?;
    }
    match kernel.mknod(
        path,
        NodeKind::Char,
        node.major as u32,
        node.minor as u32,
        0o666,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, RecordingKernel};

    #[test]
    fn nodes_are_made_owned_and_bound() {
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        let binds = prepare(&k, dir.path(), true, true).unwrap();
        assert_eq!(binds.len(), 2);
        assert_eq!(binds[0].node.path, "/dev/net/tun");
        let calls = k.calls();
        assert!(calls.contains(&Call::Mknod {
            path: dir.path().join("tun"),
            kind: NodeKind::Char,
            major: 10,
            minor: 200,
            mode: 0o666
        }));
        assert!(calls.contains(&Call::Chown {
            path: dir.path().join("fuse"),
            uid: 100000,
            gid: 100000
        }));
    }

    #[test]
    fn existing_node_on_restart_is_not_an_error() {
        let k = RecordingKernel::default();
        let dir = tempfile::tempdir().unwrap();
        k.existing_nodes
            .lock()
            .unwrap()
            .push(dir.path().join("tun"));
        assert!(prepare(&k, dir.path(), true, false).is_ok());
    }
}
