//! Driving the OCI runtime (sysbox-runc in production, runc or crun elsewhere).

pub mod create;
pub mod limits;
pub mod oci;
pub mod sysbox;
