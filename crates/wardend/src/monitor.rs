//! The monitor: the small root process of a privilege-separated daemon (`[daemon] privsep`).
//!
//! It parses no client input. It binds the listening sockets once (the Unix socket and the
//! gateway's port) and hands them to every child it starts, so clients that connect while a
//! child is being replaced wait in the backlog instead of being refused. It starts `core` and
//! `gateway` by re-executing its own binary (`/proc/self/exe internal core|gateway …`, so a
//! child is always the same build as its monitor, even after the file on disk was upgraded),
//! each with one control socket ([`crate::privsep`]), and then:
//! - heartbeats both over their control sockets; `tolerance` unanswered in a row → the child is
//!   hung: SIGKILL, reap, restart;
//! - restarts a child that dies (the first restart at once, then with a doubling backoff that
//!   resets after a stable run), and gives up — stops everything, exits 1 so that systemd
//!   restarts the unit — after too many restarts in a window;
//! - pairs the two whenever either is (re)started: a fresh socketpair, one end to each with the
//!   other's [`ProcessIdentity`] (pid *and* start time). The survivor replaces its channel and
//!   refuses the old one ([`crate::gateway::channel`]): the seed's `AuthorizeProcess`, immune to
//!   pid reuse;
//! - tells core the state of every component each heartbeat, for `warden daemon status`;
//! - speaks `sd_notify` when systemd asks for it: READY once both serve, STATUS on every
//!   change, WATCHDOG while its loop runs, STOPPING on the way out;
//! - forwards SIGHUP to core (reload) and turns SIGTERM/SIGINT into an orderly stop: the gateway
//!   first, then core, each drained within `daemon.shutdown_grace`.
//!
//! What it deliberately does not do: hold secrets, talk to clients, or read what the channel
//! carries.

use crate::config::Config;
use crate::privsep::control::{ComponentStatus, Control, ControlSocket};
use crate::privsep::supervise::{Decision, Heartbeats, Restarts, Tick};
use crate::privsep::{control_pair, spawn_child_with, Handoff, ProcessIdentity, Role};
use anyhow::Context;
use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// How the monitor was asked to run.
pub struct MonitorOptions {
    pub config: Config,
    /// `NAME=value` lines printed on stdout once everything serves, before `WARDEN_READY=1`.
    pub announce: Vec<(String, String)>,
    /// The arguments after `internal core` / `internal gateway` that make a child load the same
    /// configuration as this process.
    pub child_args: Vec<OsString>,
}

/// Environment a child must not see: the monitor alone speaks to systemd.
const SYSTEMD_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// How long a child that closed its control socket may take to exit before it is killed.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Runs the monitor until SIGTERM/SIGINT (exit status 0) or until it gives up on a child
/// (status 1). Builds its own single-threaded runtime: children are started from this thread,
/// which lives as long as the monitor (their `PR_SET_PDEATHSIG` is tied to it).
pub fn run(opts: MonitorOptions) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(Monitor::start(opts)?.serve())
}

/// One child the monitor keeps alive.
struct Slot {
    role: Role,
    /// The listening socket each instance of this child inherits as descriptor 4.
    listener: OwnedFd,
    restarts: Restarts,
    running: Option<Running>,
    /// When a restart is due (after a backoff).
    restart_at: Option<tokio::time::Instant>,
    /// The last heartbeat's round trip, for `daemon status`.
    last_rtt: Option<Duration>,
}

struct Running {
    process: std::process::Child,
    identity: ProcessIdentity,
    control: ControlSocket,
    started: Instant,
    beats: Heartbeats,
    ready: bool,
}

impl Slot {
    fn name(&self) -> &'static str {
        role_name(self.role)
    }

    fn ready_identity(&self) -> Option<ProcessIdentity> {
        self.running
            .as_ref()
            .filter(|r| r.ready)
            .map(|r| r.identity)
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Core => "core",
        Role::Gateway => "gateway",
    }
}

/// What happened to a child, as the event loop sees it.
enum Event {
    Message(Control),
    /// Closed its control socket, sent garbage, or exited.
    Gone(String),
}

struct Monitor {
    config: Config,
    announce: Vec<(String, String)>,
    child_args: Vec<OsString>,
    core: Slot,
    gateway: Option<Slot>,
    gateway_addr: Option<std::net::SocketAddr>,
    /// The (core, gateway) pair last handed a channel, and how many pairings were made.
    paired: Option<(ProcessIdentity, ProcessIdentity)>,
    generation: u64,
    started: Instant,
    announced: bool,
    _pid_file: crate::server::PidFile,
}

impl Monitor {
    /// Binds the sockets and writes the pid file: everything that can fail with a clear message
    /// before a child exists.
    fn start(opts: MonitorOptions) -> anyhow::Result<Monitor> {
        let cfg = opts.config;
        let unix = crate::server::listener::bind(&cfg.socket)?;
        let gateway = crate::gateway::start::bind(&cfg.gateway)?;
        let pid_file = crate::server::PidFile::create(&cfg.daemon.pid_file)?;
        let policy = cfg.monitor.restart_policy();
        let slot = |role, listener: OwnedFd| Slot {
            role,
            listener,
            restarts: Restarts::new(policy.clone()),
            running: None,
            restart_at: None,
            last_rtt: None,
        };
        let gateway_addr = gateway.as_ref().map(|g| g.addr);
        // Checked now, while a mistake can still stop the start with a clear message.
        if gateway.is_some() {
            crate::privsep::Unprivileged::resolve(&cfg.daemon.gateway_user)
                .context("daemon.gateway_user")?;
        }
        Ok(Monitor {
            core: slot(Role::Core, unix.into()),
            gateway: gateway.map(|g| slot(Role::Gateway, g.into_listener().into())),
            gateway_addr,
            config: cfg,
            announce: opts.announce,
            child_args: opts.child_args,
            paired: None,
            generation: 0,
            started: Instant::now(),
            announced: false,
            _pid_file: pid_file,
        })
    }

    async fn serve(mut self) -> anyhow::Result<i32> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let code = match self.supervise(&mut sigterm, &mut sigint, &mut sighup).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "the monitor cannot go on");
                1
            }
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.stop_all().await;
        let _ = std::fs::remove_file(&self.config.socket.path);
        tracing::info!(status = code, "warden stopped");
        Ok(code)
    }

    async fn supervise(
        &mut self,
        sigterm: &mut tokio::signal::unix::Signal,
        sigint: &mut tokio::signal::unix::Signal,
        sighup: &mut tokio::signal::unix::Signal,
    ) -> anyhow::Result<i32> {
        let m = self.config.monitor.clone();
        self.spawn(Role::Core)?;
        if self.gateway.is_some() {
            self.spawn(Role::Gateway)?;
        }
        let mut beat = tokio::time::interval(m.heartbeat_interval.get());
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // systemd's watchdog, if it set one: petted at half its period while this loop runs.
        let watchdog = sd_notify::watchdog_enabled();
        let mut pet = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| {
            (d / 2).max(Duration::from_millis(10))
        }));
        loop {
            let restart_due = [Some(&self.core), self.gateway.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|s| s.restart_at)
                .min();
            tokio::select! {
                ev = next_event(&self.core) => {
                    if let Some(code) = self.handle(Role::Core, ev).await? {
                        return Ok(code);
                    }
                }
                ev = next_event_opt(self.gateway.as_ref()) => {
                    if let Some(code) = self.handle(Role::Gateway, ev).await? {
                        return Ok(code);
                    }
                }
                _ = beat.tick() => {
                    for role in self.roles() {
                        // Heartbeats start once a child is ready; until then it has
                        // `start_timeout` (core may be unsealing the store).
                        let tick = match self.slot_mut(role).running.as_mut() {
                            Some(r) if r.ready => Some(r.beats.tick(Instant::now())),
                            Some(r) if r.started.elapsed() > m.start_timeout.get() => {
                                let why = format!("not ready within monitor.start_timeout ({})", m.start_timeout);
                                if let Some(code) = self.died(role, why, true).await? {
                                    return Ok(code);
                                }
                                None
                            }
                            _ => None,
                        };
                        match tick {
                            Some(Tick::Send(seq)) => {
                                let r = self.slot(role).running.as_ref().expect("running");
                                if r.control.send(&Control::Ping { seq }, None).await.is_err() {
                                    if let Some(code) = self.died(role, "its control socket is closed".into(), false).await? {
                                        return Ok(code);
                                    }
                                }
                            }
                            Some(Tick::Hung { missed }) => {
                                let why = format!("hung: {missed} heartbeats unanswered");
                                if let Some(code) = self.died(role, why, true).await? {
                                    return Ok(code);
                                }
                            }
                            None => {}
                        }
                    }
                    self.send_components().await;
                }
                _ = sleep_until(restart_due), if restart_due.is_some() => {
                    let now = tokio::time::Instant::now();
                    for role in self.roles() {
                        if self.slot(role).restart_at.is_some_and(|t| t <= now) {
                            self.slot_mut(role).restart_at = None;
                            if let Err(e) = self.spawn(role) {
                                let why = format!("{e:#}");
                                tracing::error!(component = role_name(role), error = %why, "cannot restart");
                                if let Some(code) = self.after_death(role, Instant::now(), why) {
                                    return Ok(code);
                                }
                            }
                        }
                    }
                }
                _ = pet.tick(), if watchdog.is_some() => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                _ = sighup.recv() => {
                    if let Some(r) = &self.core.running {
                        tracing::info!(pid = r.identity.pid, "SIGHUP: core reloads its configuration");
                        signal_child(r, nix::sys::signal::Signal::SIGHUP);
                    }
                }
                _ = sigterm.recv() => return Ok(0),
                _ = sigint.recv() => return Ok(0),
            }
        }
    }

    fn roles(&self) -> Vec<Role> {
        let mut v = vec![Role::Core];
        if self.gateway.is_some() {
            v.push(Role::Gateway);
        }
        v
    }

    fn slot(&self, role: Role) -> &Slot {
        match role {
            Role::Core => &self.core,
            Role::Gateway => self.gateway.as_ref().expect("no gateway slot"),
        }
    }

    fn slot_mut(&mut self, role: Role) -> &mut Slot {
        match role {
            Role::Core => &mut self.core,
            Role::Gateway => self.gateway.as_mut().expect("no gateway slot"),
        }
    }

    /// Starts a new instance of `role`; it is paired once it says it is ready.
    fn spawn(&mut self, role: Role) -> anyhow::Result<()> {
        let (mine, theirs) = control_pair()?;
        let mut cmd = std::process::Command::new("/proc/self/exe");
        // Named after this binary in `ps`, not after the /proc path it was started through.
        if let Some(argv0) = std::env::args_os().next() {
            std::os::unix::process::CommandExt::arg0(&mut cmd, argv0);
        }
        cmd.arg("internal")
            .arg(role_name(role))
            .args(&self.child_args);
        for k in SYSTEMD_ENV {
            cmd.env_remove(k);
        }
        cmd.stdin(std::process::Stdio::null());
        // Children log to stderr; stdout is the monitor's (dev mode's announcements).
        cmd.stdout(std::io::stderr().as_fd().try_clone_to_owned()?);
        let slot = self.slot(role);
        let process = spawn_child_with(cmd, theirs, &[slot.listener.as_fd()])
            .with_context(|| format!("cannot start {}", slot.name()))?;
        let pid = process.id() as i32;
        let identity = match ProcessIdentity::of(pid) {
            Ok(id) => id,
            Err(e) => {
                // It died at once; the control socket's end will say so too.
                tracing::warn!(component = role_name(role), pid, error = %e, "child gone right after its start");
                ProcessIdentity { pid, start_time: 0 }
            }
        };
        let tolerance = self.config.monitor.heartbeat_tolerance;
        tracing::info!(component = role_name(role), pid, "started");
        self.slot_mut(role).running = Some(Running {
            process,
            identity,
            control: ControlSocket::new(mine)?,
            started: Instant::now(),
            beats: Heartbeats::new(tolerance),
            ready: false,
        });
        self.notify_status();
        Ok(())
    }

    /// Handles one event of `role`'s current instance. `Some(code)`: the monitor must exit.
    async fn handle(&mut self, role: Role, ev: Event) -> anyhow::Result<Option<i32>> {
        match ev {
            Event::Message(Control::Pong { seq }) => {
                let slot = self.slot_mut(role);
                if let Some(r) = slot.running.as_mut() {
                    if r.beats.answered(seq, Instant::now()) {
                        slot.last_rtt = r.beats.last_round_trip();
                    }
                }
                Ok(None)
            }
            Event::Message(Control::Ready) => {
                if let Some(r) = self.slot_mut(role).running.as_mut() {
                    r.ready = true;
                    tracing::info!(component = role_name(role), pid = r.identity.pid, "ready");
                }
                self.pair().await;
                self.announce_once()?;
                self.notify_status();
                self.send_components().await;
                Ok(None)
            }
            Event::Message(other) => {
                self.died(
                    role,
                    format!("sent {other:?}, which the monitor does not take"),
                    true,
                )
                .await
            }
            Event::Gone(why) => self.died(role, why, false).await,
        }
    }

    /// `role`'s current instance is dead or must be: reap it (killing it if it does not exit
    /// by itself at once), and decide.
    async fn died(&mut self, role: Role, why: String, hung: bool) -> anyhow::Result<Option<i32>> {
        let Some(mut r) = self.slot_mut(role).running.take() else {
            return Ok(None);
        };
        // A child that closed its control socket is exiting: give it a moment to finish (and
        // to print why), then make sure. A hung one gets no moment.
        let deadline = Instant::now() + if hung { Duration::ZERO } else { EXIT_WAIT };
        let status = loop {
            match r.process.try_wait() {
                Ok(Some(s)) => break s.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(None) => {
                    let _ = r.process.kill();
                    let mut p = r.process;
                    let s = tokio::task::spawn_blocking(move || p.wait())
                        .await
                        .context("reaping a child")?;
                    break match s {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("not reaped: {e}"),
                    };
                }
                Err(e) => break format!("not reaped: {e}"),
            }
        };
        tracing::warn!(component = role_name(role), pid = r.identity.pid, %why, %status, "child ended");
        // Its successor and the survivor get a fresh channel once the successor is ready.
        self.paired = None;
        Ok(self.after_death(role, r.started, why))
    }

    fn after_death(&mut self, role: Role, started: Instant, why: String) -> Option<i32> {
        if !self.announced {
            tracing::error!(
                component = role_name(role),
                reason = %why,
                "a child failed during start-up; giving up (see its log above)"
            );
            return Some(1);
        }
        let decision = self.slot_mut(role).restarts.died(started, Instant::now());
        match decision {
            Decision::Restart { after } => {
                tracing::info!(
                    component = role_name(role),
                    after_ms = after.as_millis() as u64,
                    "restarting"
                );
                self.slot_mut(role).restart_at = Some(tokio::time::Instant::now() + after);
                self.notify_status();
                None
            }
            Decision::GiveUp { restarts, window } => {
                let text = format!(
                    "{} restarted {restarts} times within {window:?}; giving up",
                    role_name(role)
                );
                tracing::error!(
                    component = role_name(role),
                    restarts,
                    ?window,
                    "giving up: too many restarts"
                );
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
                Some(1)
            }
        }
    }

    /// Hands a fresh channel to core and the gateway if both are ready and not yet paired
    /// with each other.
    async fn pair(&mut self) {
        let Some(gw_slot) = &self.gateway else {
            return;
        };
        let (Some(core), Some(gw)) = (self.core.ready_identity(), gw_slot.ready_identity()) else {
            return;
        };
        if self.paired == Some((core, gw)) {
            return;
        }
        let (core_end, gw_end) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a core-gateway channel");
                return;
            }
        };
        self.generation += 1;
        let generation = self.generation;
        let to_core = Handoff {
            peer_role: Role::Gateway,
            peer: gw,
            generation,
        };
        let to_gw = Handoff {
            peer_role: Role::Core,
            peer: core,
            generation,
        };
        let c = self.core.running.as_ref().expect("core is ready");
        let g = gw_slot.running.as_ref().expect("the gateway is ready");
        // Core first: the gateway starts serving once it has its end, and its first call must
        // find core's end installed.
        let sent = c
            .control
            .send(&Control::Pair { handoff: to_core }, Some(core_end.as_fd()))
            .await;
        let sent = match sent {
            Ok(()) => {
                g.control
                    .send(&Control::Pair { handoff: to_gw }, Some(gw_end.as_fd()))
                    .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                tracing::info!(
                    generation,
                    core = core.pid,
                    gateway = gw.pid,
                    "core and gateway paired"
                );
                self.paired = Some((core, gw));
            }
            // The one that could not take it is dead; its end of the control socket says so
            // next, and the pairing is made again with its successor.
            Err(e) => tracing::warn!(error = format!("{e:#}"), "pairing failed"),
        }
    }

    /// Prints dev mode's announcements and tells systemd once every child is ready and paired.
    fn announce_once(&mut self) -> anyhow::Result<()> {
        if self.announced
            || self.core.ready_identity().is_none()
            || self
                .gateway
                .as_ref()
                .is_some_and(|g| g.ready_identity().is_none())
        {
            return Ok(());
        }
        self.announced = true;
        let mut out = std::io::stdout().lock();
        for (k, v) in &self.announce {
            writeln!(out, "{k}={v}")?;
        }
        if let Some(a) = self.gateway_addr {
            writeln!(out, "WARDEN_LISTEN={a}")?;
        }
        writeln!(out, "WARDEN_READY=1")?;
        out.flush()?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!(
            socket = %self.config.socket.path.display(),
            gateway = ?self.gateway_addr,
            processes = if self.gateway.is_some() { "monitor, core, gateway" } else { "monitor, core" },
            version = env!("CARGO_PKG_VERSION"),
            "warden is serving"
        );
        Ok(())
    }

    fn components(&self) -> Vec<ComponentStatus> {
        let mut v = vec![ComponentStatus {
            role: "monitor".into(),
            pid: Some(std::process::id() as i32),
            uptime_seconds: self.started.elapsed().as_secs(),
            restarts: 0,
            heartbeat_rtt_us: None,
        }];
        for slot in [Some(&self.core), self.gateway.as_ref()]
            .into_iter()
            .flatten()
        {
            v.push(ComponentStatus {
                role: slot.name().into(),
                pid: slot.running.as_ref().map(|r| r.identity.pid),
                uptime_seconds: slot
                    .running
                    .as_ref()
                    .map_or(0, |r| r.started.elapsed().as_secs()),
                restarts: slot.restarts.total(),
                heartbeat_rtt_us: slot.last_rtt.map(|d| d.as_micros() as u64),
            });
        }
        v
    }

    async fn send_components(&self) {
        let Some(core) = self.core.running.as_ref().filter(|r| r.ready) else {
            return;
        };
        let msg = Control::Components {
            components: self.components(),
        };
        // A core that cannot take it is dead or dying; its control socket says so next.
        let _ = core.control.send(&msg, None).await;
    }

    fn notify_status(&self) {
        let text = self
            .components()
            .iter()
            .skip(1)
            .map(|c| match c.pid {
                Some(pid) => format!("{} pid {pid} ({} restarts)", c.role, c.restarts),
                None => format!("{} restarting ({} restarts)", c.role, c.restarts),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
    }

    /// The orderly stop: SIGTERM to the gateway (no new requests reach core), then to core;
    /// each gets `daemon.shutdown_grace` (plus the time to stop jobs) before SIGKILL.
    async fn stop_all(&mut self) {
        let grace = self.config.daemon.shutdown_grace.get()
            + self.config.jobs.stop_grace.get()
            + Duration::from_secs(5);
        for role in [Role::Gateway, Role::Core] {
            if role == Role::Gateway && self.gateway.is_none() {
                continue;
            }
            let Some(mut r) = self.slot_mut(role).running.take() else {
                continue;
            };
            signal_child(&r, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            loop {
                match r.process.try_wait() {
                    Ok(Some(status)) => {
                        tracing::info!(component = role_name(role), %status, "stopped");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok(None) => {
                        tracing::warn!(
                            component = role_name(role),
                            "still running after the grace period; killing it"
                        );
                        let _ = r.process.kill();
                        let _ = r.process.wait();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(component = role_name(role), error = %e, "cannot wait for it");
                        break;
                    }
                }
            }
        }
    }
}

/// Signals the very process `r` names (never a later process that reuses its pid: it is our
/// unreaped child, so its pid cannot be reused yet).
fn signal_child(r: &Running, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.identity.pid), sig);
}

async fn next_event(slot: &Slot) -> Event {
    let Some(r) = &slot.running else {
        return std::future::pending().await;
    };
    match r.control.recv().await {
        Ok(Some((msg, _fd))) => Event::Message(msg),
        Ok(None) => Event::Gone("it closed its control socket (exited)".into()),
        Err(e) => Event::Gone(format!("{e:#}")),
    }
}

async fn next_event_opt(slot: Option<&Slot>) -> Event {
    match slot {
        Some(s) => next_event(s).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
