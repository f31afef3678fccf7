//! envbox: PID 1 of a privileged pod that runs a developer workspace as a non-privileged system
//! container. `docker` reads as the start-up sequence; each step lives in its own module.

use envbox::{
    buildlog, bundle, cgroup, cli, coderlog, config, docker_shim, exec, image, init, net, pid1,
    pod, runtime, secrets, statedir, sys, teardown, workspace,
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
use teardown::{Made, StopPlan, Teardown};

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
        image::auth::register_pull_secret(s);
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
    if let Some(s) = &cfg.image.pull_secret {
        image::auth::register_pull_secret(s);
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
    // First of all that changes anything: a second pod on this volume must not touch the first's
    // writable layer, runtime state or network.
    let _state_lock = match statedir::StateDirLock::acquire(&cfg.state_dir) {
        Ok(l) => l,
        Err(e) => return fail(&log, &e.to_string()),
    };
    // The cgroup namespace belongs to the calling thread and is inherited by the threads it starts
    // later, which spawn every child; only the Coder log sender (which spawns nothing) predates it.
    if cgroup::detect_layout() == cgroup::Layout::Unified {
        if let Err(e) =
            cgroup::delegate_pod_cgroup(&kernel, std::path::Path::new(cgroup::CGROUP_ROOT), &|| {
                std::fs::read_to_string("/proc/self/mountinfo")
            })
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
    // Before any child exists, so each one inherits envbox's place and moves only upwards from it.
    let oom = pod::oom_order(&kernel, &|m| log.info(m));
    if let Err(e) = pod::prepare(&kernel) {
        return fail(&log, &e.to_string());
    }
    let started = Instant::now();
    let link = Link { plan, mtu };
    match start_workspace(&cfg, &log, &sup, &kernel, &link, &oom) {
        Ok(running) => {
            log.info(format!(
                "Workspace started in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            log.done();
            image::gc::spawn(cfg.image.cache_dir.clone(), cfg.image.cache_max_size);
            supervise(&cfg, &log, &sup, running)
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

struct Running<'a> {
    /// Holds the container, the link, the rootfs and the daemons, in the order they unwind.
    undo: Teardown<'a>,
    bootstrap: Option<workspace::Bootstrap>,
}

impl Running<'_> {
    fn ws(&self) -> &workspace::Workspace {
        self.undo
            .container()
            .expect("a running workspace has its container on the undo stack")
    }
}

fn start_workspace<'a>(
    cfg: &Config,
    log: &Arc<BuildLog>,
    sup: &'a Arc<Supervisor>,
    kernel: &'a RealKernel,
    link: &'a Link,
    oom: &pod::OomOrder,
) -> Result<Running<'a>, Abort> {
    let failed = |e: &dyn std::fmt::Display| Abort::Failed(e.to_string());
    // 0711, not 0700: the container's root (host uid 100000 in its user namespace) must be able
    // to traverse to the bundle's rootfs below, but nobody else may list or read what is here.
    image::durable::private_dir(&cfg.state_dir, 0o711).map_err(|e| {
        Abort::Failed(format!(
            "creating CODER_STATE_DIR {} (mode 0711): {e}",
            cfg.state_dir.display()
        ))
    })?;

    // The state lock created CODER_STATE_DIR. A stop that never finished (SIGKILL, a lost node) left
    // the last start's token behind; it goes before anything else.
    if !statedir::remove_secrets(&cfg.state_dir).is_empty() {
        log::info!("removed the agent token files the last run left in CODER_STATE_DIR (it did not stop cleanly)");
    }

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
    let sysbox_opts = runtime::sysbox::SysboxOptions {
        bin_dir: cfg.runtime.binary.parent().map(|p| p.to_path_buf()),
        disable_idmapped_mount: cfg.disable_idmapped_mount,
        oom_score_adj: oom.daemons,
    };
    let sysbox = (cfg.runtime.kind == config::RuntimeKind::SysboxRunc).then(|| {
        let opts = sysbox_opts.clone();
        let (s, l) = (Arc::clone(sup), Arc::clone(log));
        let runc = cfg.runtime.binary.clone();
        sup.start_step("sysbox", move || {
            l.info("Waiting for sysbox processes to startup...");
            runtime::sysbox::preflight()?;
            let d = runtime::sysbox::start(&s, &opts, &|m| l.info(m), &|| s.stop_requests() > 0)?;
            // What a failure report needs first: which kernel, which sysbox, and whether sysbox
            // will ID-map or shift the workspace's volumes.
            let caps = runtime::sysbox::mgr_capabilities(&d.mgr.tail.text());
            l.info(format!(
                "Kernel {}, {}; sysbox-mgr: {}",
                runtime::sysbox::kernel_release(),
                runtime::sysbox::version(&s, &runc),
                if caps.is_empty() {
                    "no report on ID-mapped mounts or shiftfs".to_string()
                } else {
                    caps.join("; ")
                }
            ));
            Ok::<_, runtime::sysbox::SysboxError>(d)
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
    let mut undo = Teardown::new(sup, kernel, &link.plan, &cfg.state_dir);
    match sysbox.map(|step| step.wait(sup)) {
        None => {}
        Some(Ok(Ok(d))) => undo.push(Made::Daemons(d)),
        Some(Ok(Err(e))) => return Err(failed(&e)),
        Some(Err(_)) => return Err(Abort::Stopped),
    }
    let pulled = match pulled {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(undo.abort(failed(&e))),
        Err(_) => {
            cancel.store(true, Ordering::SeqCst);
            return Err(undo.abort(Abort::Stopped));
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
    let (layers, cache, state, persist) = (
        image::layer_blobs(p),
        cfg.image.cache_dir.clone(),
        cfg.state_dir.clone(),
        cfg.persist_rootfs,
    );
    let (config_digest, reference) = (
        p.image.config_digest.clone(),
        cfg.image.reference.to_string(),
    );
    let l = Arc::clone(log);
    let rootfs = match sup.run_step("unpack", move || {
        image::persist::prepare(
            &RealKernel,
            &cache,
            &state,
            &layers,
            Some(std::path::Path::new(EPHEMERAL_DIR)),
            &image::persist::Persistence {
                mode: persist,
                config_digest: &config_digest,
                reference: &reference,
            },
            &|m| l.info(m),
        )
    }) {
        Ok(Ok(prepared)) => {
            for n in &prepared.notes {
                log.info(n);
            }
            prepared.rootfs
        }
        Ok(Err(e)) => return Err(undo.abort(failed(&e))),
        Err(_) => return Err(undo.abort(Abort::Stopped)),
    };
    log.info(format!(
        "Prepared the root filesystem ({} layers unpacked, {} cached) in {:.1} s",
        rootfs.unpacked_layers,
        p.image.layers.len() - rootfs.unpacked_layers.min(p.image.layers.len()),
        t.elapsed().as_secs_f64()
    ));
    let rootfs_path = rootfs.path.clone();
    undo.push(Made::Rootfs(rootfs));

    let username = cfg.username.clone().unwrap_or_default();
    let facts = match image::facts::read_facts(&rootfs_path, &username) {
        Ok(f) => f,
        Err(e) => {
            return Err(undo.abort(Abort::Failed(format!(
                "{e} (image {})",
                cfg.image.reference
            ))))
        }
    };
    log.info(format!(
        "Detected workspace user {:?} (uid {}, gid {}) with home directory {:?}",
        facts.user.name, facts.user.uid, facts.user.gid, facts.user.home
    ));

    let id = workspace::fresh_id();
    let envbox_binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            return Err(undo.abort(Abort::Failed(format!(
                "finding envbox's own binary for the workspace's init: {e}"
            ))))
        }
    };
    let settings = bundle::ImageSettings {
        env: p.image.config.env.clone().unwrap_or_default(),
        working_dir: p.image.config.working_dir.clone(),
        stop_signal: p.image.config.stop_signal.clone(),
    };
    log.info(bundle::init_log_line(&facts));
    for note in bundle::mounts::read_only_owner_notes(&cfg.mounts) {
        log.info(note);
    }
    // Written through the root into the writable layer from this pod's facts; a kept layer has them
    // removed at the next start (image::persist), so a pod on another node gets its own.
    let mut per_start_files = Vec::new();
    if inner_docker_mtu(&rootfs_path, link.mtu, log) {
        per_start_files.push(net::DAEMON_JSON_PATH);
    }
    if bundle::add_machine_id(&facts, &rootfs_path) {
        per_start_files.push(bundle::MACHINE_ID);
    }
    if cfg.persist_rootfs != image::persist::PersistRootfs::Off {
        image::persist::record_envbox_files(&cfg.state_dir, &per_start_files);
    }
    let bundle_dir = cfg.state_dir.join("bundle");
    let volume_shift = match undo.daemons() {
        Some(d)
            if runtime::sysbox::idmaps_binds(&d.mgr.tail.text(), cfg.disable_idmapped_mount) =>
        {
            bundle::mounts::VolumeShift::IdMappedBySysbox
        }
        _ => bundle::mounts::VolumeShift::Shift,
    };
    let bundle = bundle::prepare(
        kernel,
        &bundle::BundleInput {
            config: cfg,
            facts: &facts,
            image: &settings,
            rootfs: &rootfs_path,
            dir: &bundle_dir,
            envbox_binary: &envbox_binary,
            container_id: &id,
            oom_score_adj: oom.workspace,
            volume_shift,
        },
    );
    undo.push(Made::TokenFiles);
    let bundle = match bundle {
        Ok(b) => b,
        Err(e) => return Err(undo.abort(failed(&e))),
    };
    for n in &bundle.notes {
        log.info(format!("Volume {n}"));
    }
    if sup.stop_requests() > 0 {
        return Err(undo.abort(Abort::Stopped));
    }

    log.info("Creating workspace...");
    undo.push(Made::Link);
    let mut steps = StartCreate {
        cfg,
        sup,
        log,
        kernel,
        oom,
        facts: &facts,
        settings: &settings,
        rootfs: &rootfs_path,
        bundle_dir: &bundle_dir,
        envbox_binary: &envbox_binary,
        bundle,
        bundle_id: id.clone(),
        volume_shift,
        undo: &mut undo,
        sysbox_opts: &sysbox_opts,
    };
    let created = runtime::create::create_with_restart(
        &mut steps,
        &id,
        runtime::create::CREATE_TIMEOUT,
        &|m| log.info(m),
    );
    let bundle = steps.bundle;
    let ws = match created {
        Ok((_id, ws)) => ws,
        Err(e) => {
            // sysbox's own reasons (an AppArmor profile, the kernel) are in its daemons' output.
            let hint = undo
                .daemons()
                .map(|d| {
                    runtime::sysbox::known_causes(
                        &format!("{}\n{}", d.fs.tail.text(), d.mgr.tail.text()),
                        &runtime::sysbox::kernel_release(),
                    )
                    .join(" ")
                })
                .filter(|h| !h.is_empty());
            return Err(undo.abort(match (e, hint) {
                (runtime::oci::RuntimeError::Interrupted { .. }, _) => Abort::Stopped,
                (e, Some(hint)) => Abort::Failed(format!("{e}. {hint}")),
                (e, None) => failed(&e),
            }));
        }
    };
    if runtime::limits::needs_copy(cfg.runtime.kind) {
        copy_limits_into_init_cgroup(cfg, &ws, log);
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dirs = cgroup::workspace_dirs(&cgroup::hierarchies(&mountinfo), &bundle.cgroups_path);
    if let Err(e) = cgroup::delegate(kernel, &dirs) {
        log::warn!("delegating the workspace's cgroups: {e}");
    }
    let ws_pid = ws.pid;
    undo.push(Made::Container(ws));
    if let Err(e) = net::setup(&link.plan, ws_pid, link.mtu, sup.as_ref()) {
        return Err(undo.abort(failed(&e)));
    }
    if sup.stop_requests() > 0 {
        return Err(undo.abort(Abort::Stopped));
    }
    log.info("Starting up workspace...");
    let ws = undo.container().expect("the container was just pushed");
    if let Err(e) = ws.start(Instant::now() + runtime::oci::CALL_TIMEOUT) {
        return Err(undo.abort(failed(&e)));
    }
    log.info("Envbox startup complete!");

    let bootstrap = match &cfg.bootstrap_script {
        Some(script) => {
            log.info("Bootstrapping workspace...");
            match ws.spawn_bootstrap(&facts.user, &bundle.env, script.expose(), Arc::clone(log)) {
                Ok(b) => Some(b),
                Err(e) => return Err(undo.abort(failed(&e))),
            }
        }
        None => None,
    };
    Ok(Running { undo, bootstrap })
}

/// Start-up's side of [`runtime::create::create_with_restart`]: the bundle (rewritten for a fresh
/// id), the runtime's `create`, and sysbox's daemons for the one restart.
struct StartCreate<'a, 'b> {
    cfg: &'a Config,
    sup: &'a Arc<Supervisor>,
    log: &'a Arc<BuildLog>,
    kernel: &'a RealKernel,
    oom: &'a pod::OomOrder,
    facts: &'a image::facts::ImageFacts,
    settings: &'a bundle::ImageSettings,
    rootfs: &'a std::path::Path,
    bundle_dir: &'a std::path::Path,
    envbox_binary: &'a std::path::Path,
    bundle: bundle::Bundle,
    /// The id `bundle` was written for (its cgroups path carries it).
    bundle_id: String,
    volume_shift: bundle::mounts::VolumeShift,
    /// Where sysbox's daemons are, for the one restart.
    undo: &'a mut Teardown<'b>,
    sysbox_opts: &'a runtime::sysbox::SysboxOptions,
}

impl runtime::create::CreateSteps for StartCreate<'_, '_> {
    type Created = workspace::Workspace;

    fn create(
        &mut self,
        id: &str,
        deadline: Instant,
    ) -> Result<workspace::Workspace, runtime::oci::RuntimeError> {
        if id != self.bundle_id {
            self.bundle = bundle::prepare(
                self.kernel,
                &bundle::BundleInput {
                    config: self.cfg,
                    facts: self.facts,
                    image: self.settings,
                    rootfs: self.rootfs,
                    dir: self.bundle_dir,
                    envbox_binary: self.envbox_binary,
                    container_id: id,
                    oom_score_adj: self.oom.workspace,
                    volume_shift: self.volume_shift,
                },
            )
            .map_err(|e| runtime::oci::RuntimeError::Spawn {
                command: format!("writing the bundle for {id}"),
                source: std::io::Error::other(e.to_string()),
            })?;
            self.bundle_id = id.to_string();
        }
        let runtime = runtime::oci::OciRuntime::new(
            self.cfg.runtime.clone(),
            runtime::oci::OciRuntime::default_root(self.cfg.runtime.kind, &self.cfg.state_dir),
            Arc::clone(self.sup),
        )
        .with_oom_score_adj(self.oom.workspace);
        workspace::Workspace::create(
            runtime,
            Arc::clone(self.sup),
            id,
            &self.bundle,
            &self.cfg.state_dir,
            &self.facts.user,
            deadline,
        )
    }

    fn has_daemons(&self) -> bool {
        self.undo.daemons().is_some()
    }

    fn restart_daemons(&mut self) -> Result<(), String> {
        let (sup, log, opts) = (self.sup, self.log, self.sysbox_opts);
        self.undo.replace_daemons(|| {
            runtime::sysbox::start(sup, opts, &|m| log.info(m), &|| sup.stop_requests() > 0)
                .map_err(|e| e.to_string())
        })
    }

    fn fresh_id(&mut self) -> String {
        let mut id = workspace::fresh_id();
        // Ids are start times in milliseconds; a retry within the same one must still differ.
        while id == self.bundle_id {
            std::thread::sleep(Duration::from_millis(1));
            id = workspace::fresh_id();
        }
        id
    }
}

/// After start-up: wait for a stop request or an unexpected exit, then stop in order.
fn supervise(cfg: &Config, log: &BuildLog, sup: &Arc<Supervisor>, mut r: Running) -> ExitCode {
    let mut watched = vec![r.ws().pid];
    if let Some(b) = &r.bootstrap {
        watched.push(b.client_pid);
    }
    if let Some(d) = r.undo.daemons() {
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
                let msg = match r.undo.daemons().and_then(|d| d.name_of(pid)) {
                    Some(d) => format!(
                        "{} exited unexpectedly ({exit}); its last output:\n{}",
                        d.name,
                        d.tail.text()
                    ),
                    None => format!(
                        "the workspace's init ended unexpectedly ({exit}); its last output:\n{}",
                        r.ws().init_output.text()
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
    let stopped = r.undo.unwind(&StopPlan {
        deadline,
        // What follows the container's delete (link, mounts, daemons, the volumes' sync) keeps the
        // last part of the one deadline, so a runtime that hangs cannot leave it no time at all.
        container_deadline: deadline - teardown_reserve(cfg.shutdown_timeout),
        bootstrap: r.bootstrap.as_ref(),
        hurry: &hurry,
    });
    // What the workspace wrote to its volumes must be on disk before the pod is torn down.
    let mut synced: Vec<std::path::PathBuf> = vec![cfg.state_dir.clone()];
    synced.extend(cfg.mounts.iter().map(|m| m.source.clone()));
    synced.extend(
        bundle::mounts::DEFAULT_MOUNTS
            .iter()
            .map(|(src, _)| std::path::PathBuf::from(*src)),
    );
    sys::sync_filesystems_until(synced, deadline);
    if let Some(msg) = unexpected {
        return fail(log, &msg);
    }
    log::info!(
        "stopped {} in {:.2} s (workspace {:.2} s, link, mounts and daemons {:.2} s, volume sync {:.2} s)",
        if stopped.clean { "cleanly" } else { "with force" },
        t.elapsed().as_secs_f64(),
        stopped.container.as_secs_f64(),
        (stopped.total - stopped.container).as_secs_f64(),
        (t.elapsed() - stopped.total).as_secs_f64()
    );
    ExitCode::SUCCESS
}

/// sysbox runs the init one cgroup below `cgroupsPath` and copies no CPU quota there: without this
/// the workspace reads its CPU limit as unlimited (see `runtime::limits`). Not fatal: the limit holds.
fn copy_limits_into_init_cgroup(cfg: &Config, ws: &workspace::Workspace, log: &BuildLog) {
    let state = runtime::limits::state_file(ws.runtime_root(), &ws.id);
    match runtime::limits::copy_limits(
        &runtime::limits::RealCgroupFiles,
        &state,
        cfg.cpus,
        cfg.memory,
        bundle::spec::CPU_PERIOD_US,
    ) {
        Ok(c) => {
            if c.cpu_written {
                log::info!("copied the CPU limit into the workspace init's cgroup (sysbox)");
            }
            if let Some(m) = c.memory_mismatch {
                log.info(format!("Memory limit inside the workspace: {m}"));
            }
        }
        Err(e) => log.info(format!("CPU limit inside the workspace: {e}")),
    }
}

/// The part of the shutdown timeout kept for the steps after the container's delete: a fifth, between
/// half a second and three seconds.
fn teardown_reserve(timeout: Duration) -> Duration {
    (timeout / 5).clamp(Duration::from_millis(500), Duration::from_secs(3))
}

/// The inner dockerd should use the pod's MTU (envbox#167). A `daemon.json` saying so is written
/// through the mounted root (so into this start's writable layer) only when the image has Docker and
/// no `daemon.json` of its own; the image's files are never rewritten.
/// Returns whether it wrote one.
fn inner_docker_mtu(rootfs: &std::path::Path, mtu: u32, log: &BuildLog) -> bool {
    use image::facts::{image_has, read_image_file};
    if ![
        "/usr/bin/dockerd",
        "/usr/sbin/dockerd",
        "/usr/local/bin/dockerd",
    ]
    .iter()
    .any(|p| image_has(rootfs, p))
    {
        return false;
    }
    let existing = read_image_file(rootfs, net::DAEMON_JSON_PATH).unwrap_or(None);
    match net::inner_docker_daemon_json(existing.as_deref(), mtu) {
        net::DaemonJsonDecision::Write(content) => {
            let owner = (
                bundle::spec::ID_MAP_HOST_START,
                bundle::spec::ID_MAP_HOST_START,
            );
            match net::write_daemon_json(rootfs, &content, owner) {
                Ok(()) => return true,
                Err(e) => log::warn!("cannot give the inner Docker the pod's MTU: {e}"),
            }
        }
        net::DaemonJsonDecision::Keep => {}
        net::DaemonJsonDecision::KeepWithWarning(w) => log.info(w),
    }
    false
}
