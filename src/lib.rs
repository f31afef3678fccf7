//! envbox as a library: one module per concern; `main.rs` sequences them.

pub mod buildlog;
pub mod bundle;
pub mod cgroup;
pub mod cli;
pub mod coderlog;
pub mod config;
pub mod docker_shim;
pub mod exec;
pub mod image;
pub mod init;
pub mod net;
pub mod pid1;
pub mod pod;
pub mod runtime;
pub mod secrets;
pub mod statedir;
pub mod sys;
pub mod teardown;
pub mod workspace;
