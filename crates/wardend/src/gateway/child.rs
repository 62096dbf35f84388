//! The gateway process of a privilege-separated daemon (`warden internal gateway`, started by
//! the monitor; see [`crate::monitor`]).
//!
//! In order: with the control socket (descriptor 3) and the listening socket the monitor bound
//! (descriptor 4) in hand, read the TLS certificate, key, CA and CRL while still root; become
//! `daemon.gateway_user` for good ([`crate::privsep::Unprivileged`]) before any thread exists
//! or any byte is read from the network; tell the monitor it is ready; start serving once the
//! monitor hands it its channel to core. Each later handoff (core was restarted) replaces the
//! channel: calls pending on the old one fail with `UNAVAILABLE`.
//!
//! SIGTERM drains and exits. SIGINT is left to the monitor (a terminal's Ctrl-C reaches every
//! process of the group; the monitor decides the order of the stop).

use super::channel::ChannelCore;
use crate::config::Config;
use crate::privsep::control::{Control, ControlSocket};
use crate::privsep::Unprivileged;
use anyhow::Context;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Runs the gateway process until SIGTERM or until the monitor goes away.
/// `control` and `listener` are what the monitor handed down (see
/// [`crate::privsep::take_inherited`]).
pub fn run(cfg: Config, control: OwnedFd, listener: OwnedFd) -> anyhow::Result<()> {
    let bound = super::start::with_listener(&cfg.gateway, std::net::TcpListener::from(listener))?;
    let user = Unprivileged::resolve(&cfg.daemon.gateway_user).context("daemon.gateway_user")?;
    // The CRL is read again whenever it changes, as `user`, through a handle on its directory
    // (see `tls`): check now that this will work, rather than keep serving a stale CRL.
    let crl = cfg
        .gateway
        .crl
        .as_deref()
        .map(super::tls::CrlFile::open)
        .transpose()?;
    // No runtime yet, so no other thread: the drop applies to the whole process from here on.
    user.apply()
        .with_context(|| format!("cannot become {}", user.name))?;
    if let (Some(crl), Some(path)) = (crl, &cfg.gateway.crl) {
        if let Err(e) = crl.read() {
            anyhow::bail!(
                "gateway.crl {}: {} cannot read it after dropping privileges ({e}); make its directory searchable and the file readable by that user (`warden pki` writes 0755 and 0644)",
                path.display(),
                user.name
            );
        }
    }
    tracing::info!(user = %user.name, uid = user.uid.as_raw(), "gateway dropped its privileges");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("warden-gateway")
        .build()?;
    rt.block_on(serve(control, bound))
}

async fn serve(control: OwnedFd, bound: super::start::Bound) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let control = ControlSocket::new(control)?;
    let core = Arc::new(ChannelCore::new());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    control.send(&Control::Ready, None).await?;
    let mut bound = Some(bound);
    let mut serving = None;
    loop {
        tokio::select! {
            got = control.recv() => match got {
                Ok(Some((Control::Ping { seq }, _))) => {
                    if control.send(&Control::Pong { seq }, None).await.is_err() {
                        break;
                    }
                }
                Ok(Some((Control::Pair { handoff }, Some(fd)))) => {
                    core.attach(super::channel::stream_from_fd(fd)?);
                    tracing::info!(core = handoff.peer.pid, generation = handoff.generation, "channel to core installed");
                    if let Some(b) = bound.take() {
                        serving = Some(tokio::spawn(b.run(core.clone(), shutdown_rx.clone())));
                    }
                }
                Ok(Some((other, _))) => {
                    tracing::warn!(message = ?other, "the monitor sent a message the gateway does not take");
                }
                Ok(None) => {
                    tracing::warn!("the monitor is gone; stopping");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "control socket unusable; stopping");
                    break;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => {}
        }
    }
    let _ = shutdown_tx.send(true);
    if let Some(task) = serving {
        let _ = task.await;
    }
    core.detach();
    Ok(())
}
