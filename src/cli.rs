//! Command line and environment: every input is read here as raw text and validated in `config`.
//!
//! Values are kept as strings on purpose: clap's own type errors cannot name the environment variable
//! or mask secrets, and an empty variable must count as unset (the Go envbox's rule).

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "envbox",
    about = "Runs a developer workspace as a non-privileged system container inside a privileged pod",
    disable_version_flag = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot the workspace (the main job; the stock Coder template runs `/envbox docker`).
    #[command(alias = "run")]
    Docker(Box<DockerArgs>),
    /// Pull and unpack an image into the cache, then exit (warms a node, checks credentials).
    Pull(PullArgs),
    /// Run a command inside the running workspace (from `kubectl exec` into the pod).
    Exec(ExecArgs),
    /// Print the version and exit.
    Version,
    /// PID 1 inside a workspace whose image has no /sbin/init (bind-mounted there by envbox).
    #[command(hide = true)]
    Init(InitArgs),
}

/// Every `CODER_*` input and every flag of the Go envbox, with the same names, plus our own.
/// Booleans take Go's `strconv.ParseBool` forms (1, t, T, TRUE, true, True and the false ones), and a
/// boolean flag given alone (`--add-tun`) means true, as with Go's flag package.
#[derive(Args, Debug, Default, Clone)]
pub struct DockerArgs {
    #[command(flatten)]
    pub image: ImageArgs,

    /// Workspace user; its uid, gid and home come from the image's /etc/passwd.
    #[arg(
        long = "username",
        env = "CODER_INNER_USERNAME",
        hide_env_values = true
    )]
    pub username: Option<String>,
    /// Coder agent token, passed to the workspace as CODER_AGENT_TOKEN (secret).
    #[arg(
        long = "agent-token",
        env = "CODER_AGENT_TOKEN",
        hide_env_values = true
    )]
    pub agent_token: Option<String>,
    /// Coder URL; start-up logs are sent there when the token is set too.
    #[arg(long = "coder-url", env = "CODER_AGENT_URL", hide_env_values = true)]
    pub agent_url: Option<String>,
    /// Comma-separated names of pod variables to pass into the workspace; `PREFIX*` matches a prefix.
    #[arg(long = "envs", env = "CODER_INNER_ENVS", hide_env_values = true)]
    pub inner_envs: Option<String>,
    /// Working directory of the workspace (default: the image's).
    #[arg(
        long = "work-dir",
        env = "CODER_INNER_WORK_DIR",
        hide_env_values = true
    )]
    pub work_dir: Option<String>,
    /// Hostname of the workspace (default: `workspace`).
    #[arg(
        long = "hostname",
        env = "CODER_INNER_HOSTNAME",
        hide_env_values = true
    )]
    pub hostname: Option<String>,
    /// IPv4 CIDR of the pod-workspace link, prefix at most /30 (default 172.19.0.1/30).
    #[arg(
        long = "bridge-cidr",
        env = "CODER_DOCKER_BRIDGE_CIDR",
        hide_env_values = true
    )]
    pub bridge_cidr: Option<String>,
    /// Script fed to `/bin/sh -s` as the workspace user once the workspace runs (secret).
    #[arg(
        long = "bootstrap-script",
        alias = "boostrap-script",
        env = "CODER_BOOTSTRAP_SCRIPT",
        hide_env_values = true
    )]
    pub bootstrap_script: Option<String>,
    /// Comma-separated `src:dst[:ro|:rw]` bind mounts from the pod into the workspace.
    #[arg(long = "mounts", env = "CODER_MOUNTS", hide_env_values = true)]
    pub mounts: Option<String>,
    /// Node library directory as mounted in the pod (required with CODER_ADD_GPU).
    #[arg(
        long = "usr-lib-dir",
        env = "CODER_USR_LIB_DIR",
        hide_env_values = true
    )]
    pub usr_lib_dir: Option<String>,
    /// Library directory for GPU libraries inside the workspace (default: from the image's os-release).
    #[arg(
        long = "inner-usr-lib-dir",
        env = "CODER_INNER_USR_LIB_DIR",
        hide_env_values = true
    )]
    pub inner_usr_lib_dir: Option<String>,
    /// Add /dev/net/tun to the workspace (a boolean).
    #[arg(
        long = "add-tun",
        env = "CODER_ADD_TUN",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub add_tun: Option<String>,
    /// Add /dev/fuse to the workspace (a boolean).
    #[arg(
        long = "add-fuse",
        env = "CODER_ADD_FUSE",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub add_fuse: Option<String>,
    /// Pass the pod's NVIDIA GPUs into the workspace (a boolean).
    #[arg(
        long = "add-gpu",
        env = "CODER_ADD_GPU",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub add_gpu: Option<String>,
    /// CPU limit as a Kubernetes quantity: 2, 1.5, 500m (default: unlimited).
    #[arg(long = "cpus", env = "CODER_CPUS", hide_env_values = true)]
    pub cpus: Option<String>,
    /// Memory limit in bytes or as a quantity: 4Gi, 512M (default: unlimited).
    #[arg(long = "memory", env = "CODER_MEMORY", hide_env_values = true)]
    pub memory: Option<String>,
    /// Pass --disable-idmapped-mount to sysbox-mgr (XFS volumes) (a boolean).
    #[arg(
        long = "disable-idmapped-mount",
        env = "CODER_DISABLE_IDMAPPED_MOUNT",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub disable_idmapped_mount: Option<String>,
    /// Keep the workspace's writable layer on CODER_STATE_DIR across restarts: a boolean, or
    /// keep-on-image-change to reuse it on a new image too.
    #[arg(
        long = "persist-rootfs",
        env = "CODER_PERSIST_ROOTFS",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub persist_rootfs: Option<String>,
    /// Verbose operator logs (a boolean); RUST_LOG also works.
    #[arg(
        long = "debug",
        env = "CODER_DEBUG",
        hide_env_values = true,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub debug: Option<String>,
    /// No effect; accepted because the Go envbox's CLI had it (there it discarded the build log, for its
    /// tests). The build log is always written.
    #[arg(long = "no-startup-log", num_args = 0..=1, default_missing_value = "true")]
    pub no_startup_log: Option<String>,
    /// OCI runtime: sysbox-runc (default), runc, crun, or a path to one of them.
    #[arg(long = "runtime", env = "CODER_RUNTIME", hide_env_values = true)]
    pub runtime: Option<String>,
    /// Per-start state (bundle, writable layer); must not be on overlayfs or tmpfs.
    #[arg(long = "state-dir", env = "CODER_STATE_DIR", hide_env_values = true)]
    pub state_dir: Option<String>,
    /// Seconds for the whole ordered stop after SIGTERM (default 25, under Kubernetes' 30 s grace).
    #[arg(
        long = "shutdown-timeout",
        env = "CODER_SHUTDOWN_TIMEOUT",
        hide_env_values = true
    )]
    pub shutdown_timeout: Option<String>,
    /// Pod interface whose MTU the workspace link takes (default eth0).
    #[arg(long = "ethlink", env = "CODER_ETHLINK", hide_env_values = true)]
    pub ethlink: Option<String>,
}

/// Inputs shared by `docker` and `pull`: what to pull, with which credentials, into which cache.
#[derive(Args, Debug, Default, Clone)]
pub struct ImageArgs {
    /// Workspace image reference, e.g. ubuntu:22.04 or registry.example.com/team/img@sha256:...
    #[arg(long = "image", env = "CODER_INNER_IMAGE", hide_env_values = true)]
    pub image: Option<String>,
    /// `.dockerconfigjson` content with registry credentials (secret).
    #[arg(
        long = "image-secret",
        env = "CODER_IMAGE_PULL_SECRET",
        hide_env_values = true
    )]
    pub pull_secret: Option<String>,
    /// Docker config file with registry credentials (default /root/.docker/config.json).
    #[arg(
        long = "docker-config",
        env = "CODER_DOCKER_CONFIG",
        hide_env_values = true
    )]
    pub docker_config: Option<String>,
    /// CA certificate file or directory of PEM files, trusted for registries and Coder.
    #[arg(
        long = "extra-certs-path",
        env = "CODER_EXTRA_CERTS_PATH",
        hide_env_values = true
    )]
    pub extra_certs_path: Option<String>,
    /// Comma-separated registries (host[:port]) that may be reached over plain HTTP.
    #[arg(
        long = "insecure-registries",
        env = "CODER_INSECURE_REGISTRIES",
        hide_env_values = true
    )]
    pub insecure_registries: Option<String>,
    /// Image and layer cache, kept across restarts (default /var/lib/docker/envbox, on the template's PVC).
    #[arg(long = "cache-dir", env = "CODER_CACHE_DIR", hide_env_values = true)]
    pub cache_dir: Option<String>,
    /// Size budget of the image cache, e.g. 20Gi: after a start (and `envbox pull`), images no pod
    /// uses are removed, least recently used first (default: unbounded).
    #[arg(
        long = "cache-max-size",
        env = "CODER_CACHE_MAX_SIZE",
        hide_env_values = true
    )]
    pub cache_max_size: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct PullArgs {
    /// Image to pull (overrides CODER_INNER_IMAGE).
    pub reference: Option<String>,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Verbose operator logs (a boolean).
    #[arg(long = "debug", env = "CODER_DEBUG", hide_env_values = true)]
    pub debug: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    /// User to run as: a name from the image's /etc/passwd or uid[:gid] (default: the workspace user).
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Working directory (default: the user's home).
    #[arg(long = "workdir", short = 'w')]
    pub workdir: Option<String>,
    /// KEY=VALUE to set in the command's environment (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// State directory of the running envbox.
    #[arg(long = "state-dir", env = "CODER_STATE_DIR", hide_env_values = true)]
    pub state_dir: Option<String>,
    /// Command and arguments (default: the user's shell).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct InitArgs {
    /// Seconds to wait for processes after forwarding a stop signal, before exiting anyway.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
}
