//! envbox: PID 1 of a privileged pod that runs a developer workspace as a non-privileged system
//! container. `docker` reads as the start-up sequence; each step lives in its own module.

use envbox::{
    buildlog, bundle, cgroup, cli, coderlog, config, docker_shim, exec, image, init, net, pid1,
    pod, runtime, secrets, sys, workspace,
};

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use buildlog::BuildLog;
use cli::{Cli, Command};
use config::Config;
use pid1::supervisor::{Supervisor, Wake};
use sys::real::{RealKernel, RealProcessOps};

/// Configuration errors: nothing was created, mounted or started.
const EXIT_CONFIG: u8 = 2;
const EXIT_FAILURE: u8 = 1;
/// Where the root filesystem goes when the cache volume is full: the pod's own writable layer.
const EPHEMERAL_DIR: &str = "/var/tmp/envbox";

fn main() -> ExitCode {
    // Before anything can spawn a thread: every thread inherits this mask.
    if let Err(e) = pid1::signals::block_all() {
        eprintln!("envbox: cannot block signals: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    // The outer image's /usr/local/bin/docker is a link to envbox (operators' `docker exec` habit).
    if std::env::args_os()
        .next()
        .is_some_and(|a| docker_shim::invoked_as_docker(&a))
    {
        let args: Vec<String> = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return docker_shim::run(&args);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("envbox {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Init(a) => ExitCode::from(init::run(Duration::from_secs(a.grace)) as u8),
        Command::Exec(a) => exec::run(&a),
        Command::Pull(a) => pull(&a),
        Command::Docker(a) => docker(&a),
    }
}

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format(|buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "{} {:5} {}: {}",
                buildlog::rfc3339(std::time::SystemTime::now()),
                record.level(),
                record.target(),
                secrets::scrub(&record.args().to_string())
            )
        })
        .init();
}

fn config_error(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("envbox: {e}");
    buildlog::write_termination_log(&e.to_string());
    ExitCode::from(EXIT_CONFIG)
}

fn pull(a: &cli::PullArgs) -> ExitCode {
    let cfg = match config::ImageConfig::from_args(&a.image, a.reference.as_deref()) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    if let Some(s) = &cfg.pull_secret {
        secrets::register(s);
    }
    init_logging(config::parse_bool("CODER_DEBUG", &a.debug).unwrap_or(false));
    let log = BuildLog::stderr();
    let say = |m: &str| log.info(m);
    let started = Instant::now();
    let outcome = image::pull(&cfg, None, &AtomicBool::new(false), &say).and_then(|o| {
        let cache = image::rootfs::LayerCache::open(&cfg.cache_dir)?;
        cache.ensure_all(&image::layer_blobs(&o.pulled))?;
        image::gc::run(&cfg.cache_dir, cfg.cache_max_size);
        Ok(o)
    });
    match outcome {
        Ok(o) => {
            log.info(format!(
                "Pulled and unpacked {} ({} MiB, {} layers) in {:.1} s",
                cfg.reference,
                image::total_size(&o.pulled) >> 20,
                o.pulled.image.layers.len(),
                started.elapsed().as_secs_f64()
            ));
            log.done();
            ExitCode::SUCCESS
        }
        Err(e) => {
            log.error(format!("Failed to pull {}: {e}", cfg.reference));
            log.done();
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Why start-up ended early.
enum Abort {
    Stopped,
    Failed(String),
}

fn docker(a: &cli::DockerArgs) -> ExitCode {
    let cfg = match Config::from_args(a) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    for s in cfg.secrets() {
        secrets::register(s);
    }
    init_logging(cfg.debug);
    for w in &cfg.warnings {
        log::warn!("{w}");
    }
    // The pod's network is read, not changed: a bad link plan is a configuration error too.
    let plan = net::LinkPlan {
        uplink: cfg.ethlink.clone(),
        ..net::LinkPlan::new(
            cfg.bridge.pod_addr,
            cfg.bridge.workspace_addr,
            cfg.bridge.prefix,
        )
    };
    let mtu = match plan
        .validate()
        .and_then(|_| net::uplink_mtu(&cfg.ethlink))
        .and_then(|mtu| net::check_pod_overlap(&plan).map(|_| mtu))
    {
        Ok(mtu) => mtu,
        Err(e) => return config_error(&e),
    };
    let log = Arc::new(BuildLog::stderr());
    if let (Some(url), Some(token)) = (&cfg.agent_url, &cfg.agent_token) {
        match image::registry::TlsRoots::load(cfg.image.extra_certs.as_deref()) {
            Ok(roots) => log.set_remote(Box::new(coderlog::start(url, token, &roots))),
            Err(e) => log::warn!("start-up lines are not sent to Coder: {e}"),
        }
    }
    let kernel = RealKernel;
    if let Err(e) = pod::check_privileged() {
        return fail(&log, &e.to_string());
    }
    // The cgroup namespace belongs to the calling thread and is inherited by the threads it starts
    // later, which spawn every child; only the Coder log sender (which spawns nothing) predates it.
    if cgroup::detect_layout() == cgroup::Layout::Unified {
        if let Err(e) =
            cgroup::delegate_pod_cgroup(&kernel, std::path::Path::new(cgroup::CGROUP_ROOT))
        {
            return fail(
                &log,
                &format!("preparing the pod's cgroup v2 tree for the workspace: {e}"),
            );
        }
    }
    let sup = Supervisor::new(Arc::new(RealProcessOps));
    match pid1::signals::SignalSource::open() {
        Ok(src) => pid1::spawn_signal_thread(src, Arc::clone(&sup)),
        Err(e) => return fail(&log, &format!("cannot read signals: {e}")),
    }
    if let Err(e) = pid1::become_subreaper() {
        log::warn!("cannot become a child subreaper: {e}");
    }
    if let Err(e) = pod::prepare(&kernel) {
        return fail(&log, &e.to_string());
    }
    let started = Instant::now();
    let link = Link { plan, mtu };
    match start_workspace(&cfg, &log, &sup, &kernel, &link) {
        Ok(running) => {
            log.info(format!(
                "Workspace started in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            log.done();
            image::gc::spawn(cfg.image.cache_dir.clone(), cfg.image.cache_max_size);
            supervise(&cfg, &log, &sup, &kernel, &link, running)
        }
        Err(Abort::Stopped) => {
            log.info("Stopped before the workspace started");
            log.done();
            ExitCode::SUCCESS
        }
        Err(Abort::Failed(msg)) => fail(&log, &msg),
    }
}

fn fail(log: &BuildLog, msg: &str) -> ExitCode {
    log.error(format!("Failed to run envbox: {msg}"));
    log.done();
    buildlog::write_termination_log(msg);
    ExitCode::from(EXIT_FAILURE)
}

/// The pod–workspace link, decided before start-up.
struct Link {
    plan: net::LinkPlan,
    mtu: u32,
}

struct Running {
    ws: workspace::Workspace,
    bootstrap: Option<workspace::Bootstrap>,
    rootfs: image::rootfs::Rootfs,
    daemons: Option<runtime::sysbox::SysboxDaemons>,
}

fn start_workspace(
    cfg: &Config,
    log: &Arc<BuildLog>,
    sup: &Arc<Supervisor>,
    kernel: &RealKernel,
    link: &Link,
) -> Result<Running, Abort> {
    let failed = |e: &dyn std::fmt::Display| Abort::Failed(e.to_string());
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        Abort::Failed(format!(
            "creating CODER_STATE_DIR {}: {e}",
            cfg.state_dir.display()
        ))
    })?;

    // NVIDIA's driver mounts under /proc make container creation fail (envbox#67).
    if cfg.add_gpu {
        match std::fs::read_to_string("/proc/self/mounts") {
            Ok(m) => {
                let done = bundle::gpu::unmount_proc_drivers(kernel, &m);
                if !done.is_empty() {
                    log.info(format!(
                        "Unmounted {} GPU driver mounts under /proc",
                        done.len()
                    ));
                }
            }
            Err(e) => log::warn!("reading /proc/self/mounts for GPU driver mounts: {e}"),
        }
    }
    // sysbox's daemons start while the image is pulled.
    let sysbox = (cfg.runtime.kind == config::RuntimeKind::SysboxRunc).then(|| {
        let opts = runtime::sysbox::SysboxOptions {
            bin_dir: cfg.runtime.binary.parent().map(|p| p.to_path_buf()),
            disable_idmapped_mount: cfg.disable_idmapped_mount,
        };
        let (s, l) = (Arc::clone(sup), Arc::clone(log));
        sup.start_step("sysbox", move || {
            l.info("Waiting for sysbox processes to startup...");
            runtime::sysbox::preflight()?;
            runtime::sysbox::start(&s, &opts, &|m| l.info(m), &|| s.stop_requests() > 0)
        })
    });
    let cancel = Arc::new(AtomicBool::new(false));
    let (icfg, l, c, s) = (
        cfg.image.clone(),
        Arc::clone(log),
        Arc::clone(&cancel),
        Arc::clone(sup),
    );
    let pulled = sup.run_step("pull", move || {
        image::pull(&icfg, Some(s), &c, &|m| l.info(m))
    });
    let daemons = match sysbox.map(|step| step.wait(sup)) {
        None => None,
        Some(Ok(Ok(d))) => Some(d),
        Some(Ok(Err(e))) => return Err(failed(&e)),
        Some(Err(_)) => return Err(Abort::Stopped),
    };
    let stop_daemons = |d: &Option<runtime::sysbox::SysboxDaemons>| {
        if let Some(d) = d {
            d.stop(sup, Instant::now() + Duration::from_secs(5));
        }
    };
    let pulled = match pulled {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            stop_daemons(&daemons);
            return Err(failed(&e));
        }
        Err(_) => {
            cancel.store(true, Ordering::SeqCst);
            stop_daemons(&daemons);
            return Err(Abort::Stopped);
        }
    };
    let p = &pulled.pulled;
    log.info(format!(
        "Pulled {} ({} MiB, {} layers, {} cached) in {:.1} s",
        cfg.image.reference,
        image::total_size(p) >> 20,
        p.image.layers.len(),
        p.cached_layers,
        pulled.elapsed.as_secs_f64()
    ));

    let t = Instant::now();
    let (layers, cache, state) = (
        image::layer_blobs(p),
        cfg.image.cache_dir.clone(),
        cfg.state_dir.clone(),
    );
    let l = Arc::clone(log);
    let rootfs = sup
        .run_step("unpack", move || {
            image::rootfs::prepare(
                &RealKernel,
                &cache,
                &state,
                &layers,
                Some(std::path::Path::new(EPHEMERAL_DIR)),
                &|m| l.info(m),
            )
        })
        .map_err(|_| {
            stop_daemons(&daemons);
            Abort::Stopped
        })?
        .map_err(|e| {
            stop_daemons(&daemons);
            failed(&e)
        })?;
    log.info(format!(
        "Prepared the root filesystem ({} layers unpacked, {} cached) in {:.1} s",
        rootfs.unpacked_layers,
        p.image.layers.len() - rootfs.unpacked_layers.min(p.image.layers.len()),
        t.elapsed().as_secs_f64()
    ));
    let on_error = |rootfs: &image::rootfs::Rootfs| {
        image::rootfs::release(kernel, rootfs);
        stop_daemons(&daemons);
    };

    let username = cfg.username.clone().unwrap_or_default();
    let facts = image::facts::read_facts(&rootfs.path, &username).map_err(|e| {
        on_error(&rootfs);
        Abort::Failed(format!("{e} (image {})", cfg.image.reference))
    })?;
    log.info(format!(
        "Detected workspace user {:?} (uid {}, gid {}) with home directory {:?}",
        facts.user.name, facts.user.uid, facts.user.gid, facts.user.home
    ));

    let id = workspace::fresh_id();
    let envbox_binary = std::env::current_exe().map_err(|e| failed(&e))?;
    let settings = bundle::ImageSettings {
        env: p.image.config.env.clone().unwrap_or_default(),
        working_dir: p.image.config.working_dir.clone(),
        stop_signal: p.image.config.stop_signal.clone(),
    };
    log.info(bundle::init_log_line(&facts));
    for note in bundle::mounts::read_only_owner_notes(&cfg.mounts) {
        log.info(note);
    }
    inner_docker_mtu(&rootfs.path, link.mtu, log);
    bundle::add_machine_id(&facts, &rootfs.path);
    let bundle_dir = cfg.state_dir.join("bundle");
    let bundle = bundle::prepare(
        kernel,
        &bundle::BundleInput {
            config: cfg,
            facts: &facts,
            image: &settings,
            rootfs: &rootfs.path,
            dir: &bundle_dir,
            envbox_binary: &envbox_binary,
            container_id: &id,
        },
    )
    .map_err(|e| {
        on_error(&rootfs);
        failed(&e)
    })?;
    if sup.stop_requests() > 0 {
        on_error(&rootfs);
        return Err(Abort::Stopped);
    }

    log.info("Creating workspace...");
    let runtime = runtime::oci::OciRuntime::new(
        cfg.runtime.clone(),
        runtime::oci::OciRuntime::default_root(cfg.runtime.kind, &cfg.state_dir),
        Arc::clone(sup),
    );
    let ws = workspace::Workspace::create(
        runtime,
        Arc::clone(sup),
        &id,
        &bundle,
        &cfg.state_dir,
        &facts.user,
    )
    .map_err(|e| {
        on_error(&rootfs);
        match e {
            runtime::oci::RuntimeError::Interrupted { .. } => Abort::Stopped,
            e => failed(&e),
        }
    })?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dirs = cgroup::workspace_dirs(&cgroup::hierarchies(&mountinfo), &bundle.cgroups_path);
    if let Err(e) = cgroup::delegate(kernel, &dirs) {
        log::warn!("delegating the workspace's cgroups: {e}");
    }
    let abandon = |ws: &workspace::Workspace, rootfs: &image::rootfs::Rootfs| {
        ws.stop(None, Instant::now() + Duration::from_secs(5), || true);
        if let Err(e) = net::teardown(&link.plan, sup.as_ref()) {
            log::warn!("removing the workspace's link: {e}");
        }
        on_error(rootfs);
    };
    if let Err(e) = net::setup(&link.plan, ws.pid, link.mtu, sup.as_ref()) {
        abandon(&ws, &rootfs);
        return Err(failed(&e));
    }
    if sup.stop_requests() > 0 {
        abandon(&ws, &rootfs);
        return Err(Abort::Stopped);
    }
    log.info("Starting up workspace...");
    if let Err(e) = ws.start() {
        abandon(&ws, &rootfs);
        return Err(failed(&e));
    }
    log.info("Envbox startup complete!");

    let bootstrap = match &cfg.bootstrap_script {
        Some(script) => {
            log.info("Bootstrapping workspace...");
            match ws.spawn_bootstrap(&facts.user, &bundle.env, script.expose(), Arc::clone(log)) {
                Ok(b) => Some(b),
                Err(e) => {
                    abandon(&ws, &rootfs);
                    return Err(failed(&e));
                }
            }
        }
        None => None,
    };
    Ok(Running {
        ws,
        bootstrap,
        rootfs,
        daemons,
    })
}

/// After start-up: wait for a stop request or an unexpected exit, then stop in order.
fn supervise(
    cfg: &Config,
    log: &BuildLog,
    sup: &Arc<Supervisor>,
    kernel: &RealKernel,
    link: &Link,
    mut r: Running,
) -> ExitCode {
    let mut watched = vec![r.ws.pid];
    if let Some(b) = &r.bootstrap {
        watched.push(b.client_pid);
    }
    if let Some(d) = &r.daemons {
        watched.extend(d.pids());
    }
    let unexpected = loop {
        match sup.wait_event(&watched, 0, None) {
            Wake::Stop(_) => break None,
            Wake::Exited(pid, _, exit)
                if Some(pid) == r.bootstrap.as_ref().map(|b| b.client_pid) =>
            {
                let _ = sup.try_exit(pid);
                log.info(format!("The bootstrap script ended ({exit})"));
                watched.retain(|p| *p != pid);
                r.bootstrap = None;
            }
            Wake::Exited(pid, _, exit) => {
                let msg = match r.daemons.as_ref().and_then(|d| d.name_of(pid)) {
                    Some(d) => format!(
                        "{} exited unexpectedly ({exit}); its last output:\n{}",
                        d.name,
                        d.tail.text()
                    ),
                    None => format!(
                        "the workspace's init ended unexpectedly ({exit}); its last output:\n{}",
                        r.ws.init_output.text()
                    ),
                };
                break Some(msg);
            }
            Wake::Timeout => continue,
        }
    };
    let deadline = Instant::now() + cfg.shutdown_timeout;
    let hurry = || sup.stop_requests() > 1;
    let t = Instant::now();
    let clean = r.ws.stop(r.bootstrap.as_ref(), deadline, hurry);
    if let Err(e) = net::teardown(&link.plan, sup.as_ref()) {
        log::warn!("removing the workspace's link: {e}");
    }
    image::rootfs::release(kernel, &r.rootfs);
    if let Some(d) = &r.daemons {
        d.stop(sup, deadline);
    }
    // What the workspace wrote to its volumes must be on disk before the pod is torn down.
    let mut synced: Vec<&std::path::Path> = vec![&cfg.state_dir];
    synced.extend(cfg.mounts.iter().map(|m| m.source.as_path()));
    synced.extend(
        bundle::mounts::DEFAULT_MOUNTS
            .iter()
            .map(|(src, _)| std::path::Path::new(*src)),
    );
    sys::sync_filesystems(&synced);
    if let Some(msg) = unexpected {
        return fail(log, &msg);
    }
    log::info!(
        "stopped {} in {:.2} s",
        if clean { "cleanly" } else { "with force" },
        t.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// The inner dockerd should use the pod's MTU (envbox#167). A `daemon.json` saying so is written
/// through the mounted root (so into this start's writable layer) only when the image has Docker and
/// no `daemon.json` of its own; the image's files are never rewritten.
fn inner_docker_mtu(rootfs: &std::path::Path, mtu: u32, log: &BuildLog) {
    use image::facts::{image_has, read_image_file};
    if ![
        "/usr/bin/dockerd",
        "/usr/sbin/dockerd",
        "/usr/local/bin/dockerd",
    ]
    .iter()
    .any(|p| image_has(rootfs, p))
    {
        return;
    }
    let existing = read_image_file(rootfs, net::DAEMON_JSON_PATH).unwrap_or(None);
    match net::inner_docker_daemon_json(existing.as_deref(), mtu) {
        net::DaemonJsonDecision::Write(content) => {
            let owner = (
                bundle::spec::ID_MAP_HOST_START,
                bundle::spec::ID_MAP_HOST_START,
            );
            if let Err(e) = net::write_daemon_json(rootfs, &content, owner) {
                log::warn!("cannot give the inner Docker the pod's MTU: {e}");
            }
        }
        net::DaemonJsonDecision::Keep => {}
        net::DaemonJsonDecision::KeepWithWarning(w) => log.info(w),
    }
}
