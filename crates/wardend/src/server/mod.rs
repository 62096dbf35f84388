//! The daemon proper: binds the socket, accepts connections, reloads on SIGHUP, drains on
//! SIGTERM/SIGINT.

pub mod commands;
pub mod conn;
pub mod frame;
pub mod listener;
pub mod methods;
pub mod pipeline;
pub mod secrets;
pub mod state;

use crate::audit::AuditLog;
use crate::config::Config;
use anyhow::Context;
use state::{Peer, Runtime, State};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

/// How the daemon was asked to run.
pub struct RunOptions {
    pub config: Config,
    /// The file SIGHUP re-reads; `None` in dev mode.
    pub config_path: Option<PathBuf>,
    pub dev_mode: bool,
    /// `NAME=value` lines printed on stdout before serving (dev mode's environment), followed
    /// by `WARDEN_READY=1`.
    pub announce: Vec<(String, String)>,
    /// Unseal the secret store at start from this file (`--master-password-file`); see
    /// [`secrets::master_password_file`] for the other places looked at.
    pub master_password_file: Option<PathBuf>,
    /// Set when this process is `core` under a monitor (privilege separation): what the monitor
    /// handed down instead of the socket this process would bind itself.
    pub supervised: Option<Supervised>,
}

/// What core receives from its monitor.
pub struct Supervised {
    /// The control socket: heartbeats, the channel to the gateway, component status.
    pub control: std::os::fd::OwnedFd,
    /// The Unix socket, bound (and kept open across restarts) by the monitor.
    pub listener: std::os::fd::OwnedFd,
}

/// Runs until SIGTERM or SIGINT, then drains in-flight requests for up to
/// `daemon.shutdown_grace` and returns.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Before anything a signal could leave behind (socket, pid file) and before readiness is
    // announced: a SIGHUP or SIGTERM sent as soon as the daemon says it is ready must find the
    // handlers in place, not the default action (which kills the process on the spot).
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let config = opts.config;
    let grace = config.daemon.shutdown_grace.get();
    let audit = AuditLog::open(config.audit.audit_config())
        .with_context(|| format!("cannot open the audit log {}", config.audit.path.display()))?;
    let runtime = Runtime::build(config, 1).context("invalid configuration")?;
    let cfg = runtime.config.clone();
    let state = Arc::new(State::new(runtime, opts.config_path, audit, opts.dev_mode));
    secrets::start(
        &state.secrets,
        secrets::master_password_file(
            opts.master_password_file.as_deref(),
            cfg.secrets.master_password_file.as_deref(),
        )
        .as_deref(),
    )
    .await?;

    // Upstream mode: the secrets served are the ones mirrored from the central warden, from the
    // first request on (unavailable until the first fetch).
    let mirror = cfg.upstream.url.is_some().then(|| {
        let mirror = Arc::new(crate::upstream::Mirror::new(&cfg.upstream));
        state.secrets.set_mirror(mirror.clone());
        mirror
    });

    match state.jobs.describe() {
        Ok(lines) => tracing::info!(controllers = ?lines, "job cgroups"),
        Err(e) => tracing::warn!(error = %e, "no cgroups: jobs cannot start on this host"),
    }
    match state.jobs.cleanup_stale() {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "removed job cgroups left by a daemon that died"),
        Err(e) => tracing::warn!(error = %e, "cleaning job cgroups left by a dead daemon failed"),
    }

    let (std_listener, pid_file, gateway, control) = match opts.supervised {
        // Under a monitor: it bound the socket, owns the pid file and runs the gateway.
        Some(sup) => {
            let l = std::os::unix::net::UnixListener::from(sup.listener);
            l.set_nonblocking(true)?;
            let control = crate::privsep::control::ControlSocket::new(sup.control)?;
            (l, None, None, Some(control))
        }
        None => (
            listener::bind(&cfg.socket)?,
            Some(PidFile::create(&cfg.daemon.pid_file)?),
            crate::gateway::start::bind(&cfg.gateway)?,
            None,
        ),
    };
    let supervised = control.is_some();
    let listener = tokio::net::UnixListener::from_std(std_listener)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let tracker = TaskTracker::new();
    // Core's side of the control socket: answers heartbeats, installs each channel the
    // monitor hands over, keeps the component status; ends when the monitor goes.
    let (monitor_gone_tx, mut monitor_gone) = tokio::sync::oneshot::channel::<()>();
    if let Some(control) = control {
        control
            .send(&crate::privsep::control::Control::Ready, None)
            .await?;
        // Not tracked: it answers heartbeats until this process exits, drain included.
        tokio::spawn(core_control(
            state.clone(),
            control,
            tracker.clone(),
            monitor_gone_tx,
        ));
    } else {
        drop(monitor_gone_tx);
        let mut out = std::io::stdout().lock();
        for (k, v) in &opts.announce {
            writeln!(out, "{k}={v}")?;
        }
        if let Some(g) = &gateway {
            writeln!(out, "WARDEN_LISTEN={}", g.addr)?;
        }
        writeln!(out, "WARDEN_READY=1")?;
        out.flush()?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    tracing::info!(
        socket = %cfg.socket.path.display(),
        audit = %cfg.audit.path.display(),
        dev_mode = opts.dev_mode,
        supervised,
        version = env!("CARGO_PKG_VERSION"),
        "core is serving"
    );
    let upstream = mirror.map(|mirror| {
        let st = state.clone();
        tokio::spawn(crate::upstream::run(
            mirror,
            cfg.upstream.clone(),
            move || st.secrets.notify_changed(),
        ))
    });
    if let Some(g) = gateway {
        let core = Arc::new(crate::gateway::InProcess::new(state.clone()));
        tracker.spawn(g.run(core, shutdown_rx.clone()));
    }

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let m = &state.metrics;
                let max = state.runtime().config.limits.max_connections;
                if m.active_connections.load(Ordering::Relaxed) >= max {
                    m.connections_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(max, "connection limit reached; closing a new connection");
                    drop(stream);
                    continue;
                }
                m.active_connections.fetch_add(1, Ordering::Relaxed);
                m.connections_total.fetch_add(1, Ordering::Relaxed);
                let state = state.clone();
                let rx = shutdown_rx.clone();
                tracker.spawn(async move {
                    accept_one(&state, stream, rx).await;
                    state.metrics.active_connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = sighup.recv() => {
                let st = state.clone();
                match tokio::task::spawn_blocking(move || st.reload()).await {
                    Ok(Ok(report)) => tracing::info!(generation = report.generation, needs_restart = ?report.needs_restart, "configuration reloaded"),
                    Ok(Err(e)) => tracing::error!(error = %e, "reload failed; the running configuration is kept"),
                    Err(e) => tracing::error!(error = %e, "reload task failed"),
                }
            }
            _ = sigterm.recv() => break,
            // Under a monitor, Ctrl-C is the monitor's to act on: it stops the gateway first.
            _ = sigint.recv() => if !supervised { break },
            _ = &mut monitor_gone, if supervised => {
                tracing::warn!("the monitor is gone; stopping");
                break;
            }
        }
    }

    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight requests"
    );
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    drop(listener);
    if !supervised {
        // Under a monitor the socket stays bound for the next core; the monitor removes it.
        let _ = std::fs::remove_file(&cfg.socket.path);
    }
    let _ = shutdown_tx.send(true);
    state.secrets.close_watchers();
    // Jobs end first, so that streams following them end too and the drain can finish.
    let job_grace = state.runtime().config.jobs.stop_grace.get();
    state.jobs.shutdown(job_grace).await;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("grace period over; exiting with requests still in flight");
    }
    // A start that was already past the check when shutdown began.
    state.jobs.shutdown(std::time::Duration::ZERO).await;
    if let Some(task) = upstream {
        task.abort();
    }
    state.audit.close().await;
    drop(pid_file);
    tracing::info!("warden stopped");
    Ok(())
}

/// Core's end of its control socket to the monitor.
async fn core_control(
    state: Arc<State>,
    control: crate::privsep::control::ControlSocket,
    tracker: TaskTracker,
    gone: tokio::sync::oneshot::Sender<()>,
) {
    use crate::privsep::control::Control;
    let pairing = crate::gateway::channel::Pairing::new();
    loop {
        match control.recv().await {
            Ok(Some((Control::Ping { seq }, _))) => {
                if control.send(&Control::Pong { seq }, None).await.is_err() {
                    break;
                }
            }
            Ok(Some((Control::Pair { handoff }, Some(fd)))) => {
                let stream = match crate::gateway::channel::stream_from_fd(fd) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot use the channel the monitor handed over");
                        continue;
                    }
                };
                tracing::info!(
                    gateway = handoff.peer.pid,
                    generation = handoff.generation,
                    "channel to the gateway installed; the previous one is refused from now on"
                );
                let installed = pairing.install(stream);
                tracker.spawn(crate::gateway::channel::serve(state.clone(), installed));
            }
            Ok(Some((Control::Components { components }, _))) => {
                state.set_components(components);
            }
            Ok(Some((other, _))) => {
                tracing::warn!(message = ?other, "the monitor sent a message core does not take");
            }
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "control socket unusable");
                break;
            }
        }
    }
    let _ = gone.send(());
}

async fn accept_one(
    state: &Arc<State>,
    stream: tokio::net::UnixStream,
    shutdown: watch::Receiver<bool>,
) {
    let st = state.clone();
    let fd = match stream.as_fd_owned() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot duplicate the connection's descriptor");
            return;
        }
    };
    let attested = tokio::task::spawn_blocking(move || {
        use std::os::fd::AsFd;
        st.attestor.attest_unix(fd.as_fd())
    })
    .await;
    let principal = match attested {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "peer attestation failed; closing the connection");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "attestation task failed");
            return;
        }
    };
    let peer = Arc::new(Peer::new(principal, &state.runtime()));
    conn::serve(state.clone(), peer, stream, shutdown).await;
}

trait AsFdOwned {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl AsFdOwned for tokio::net::UnixStream {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}

/// The pid file: written at start, removed at exit. A pid file naming a live process that is
/// not us is left alone (the socket check already refused to start a second daemon).
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(path: &Path) -> anyhow::Result<PidFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let tmp = path.with_extension("pid.tmp");
        std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if let Ok(s) = std::fs::read_to_string(&self.0) {
            if s.trim() == std::process::id().to_string() {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }
}
