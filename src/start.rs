//! Starting a gateway and running it until shutdown: the state built from the configuration, the listeners, and
//! the background tasks (config reload on SIGHUP, the tunnel watcher, the sweep of expired sessions and old audit
//! events).

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::gateway::{Error, Gateway};
use crate::{metrics, server};

/// Runs the gateway on `listener` until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with_clock(listener, config, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with an injected clock (tests move time by hand).
pub async fn run_with_clock(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let metrics_listen = config.metrics.listen;
    let gw = Arc::new(arc_swap::ArcSwap::from_pointee(Gateway::build(config, clock).await?));
    let mut background = vec![
        tokio::spawn(sweep(gw.clone())),
        tokio::spawn(reload_on_sighup(gw.clone())),
        tokio::spawn(watch_tunnels(gw.clone())),
    ];
    if let Some(addr) = metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr: addr.to_string(), source })?;
        let current = gw.clone();
        let scrape = move || {
            let gw = current.load();
            metrics::Scrape {
                token: gw.config.metrics.token.clone(),
                metrics: gw.metrics.clone(),
                store: gw.store.clone(),
            }
        };
        background.push(tokio::spawn(server::serve_metrics(listener, scrape)));
    }
    server::serve(gw, listener, shutdown).await;
    for task in background {
        task.abort();
    }
    Ok(())
}

/// Re-reads the config file on SIGHUP; an invalid file keeps the running config and says why.
async fn reload_on_sighup(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let current = gw.load_full();
        let Some(path) = current.config.source.clone() else {
            tracing::warn!("SIGHUP: the config did not come from a file; nothing to reload");
            continue;
        };
        let next =
            Config::load(&path).map_err(|e| e.to_string()).and_then(|c| current.reload(c).map_err(|e| e.to_string()));
        match next {
            Ok(new) => {
                gw.store(Arc::new(new));
                tracing::info!(config = %path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!(error = %e, "reload failed; still running the previous configuration"),
        }
    }
}

/// How often the tunnel watcher looks for revocations: well inside the ~1 s revocation bound.
const TUNNEL_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// Closes every upgraded tunnel whose session ended ([`proxy::tunnels`]): on each move of the revocation revision
/// (here, the CLI or another instance) every tunnel's session is read again; otherwise a tunnel's session is
/// read right after the tunnel opens and when it reaches its idle or absolute limit. Tunnels the client used
/// refresh their sessions first.
async fn watch_tunnels(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    let mut tick = tokio::time::interval(TUNNEL_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seen = None;
    loop {
        tick.tick().await;
        let gw = gw.load_full();
        if gw.tunnels.count() == 0 {
            seen = None;
            continue;
        }
        // An unreadable revision counts as moved: every tunnel's session is checked (and fails closed).
        let revision = gw.store.revision().ok();
        let all = revision.is_none() || revision != seen;
        seen = revision;
        let now = gw.clock.now();
        // Traffic through a tunnel is use of the app: it refreshes the session before any look at its limits.
        for (session, at) in gw.tunnels.active(gw.sessions.touch_every()) {
            gw.sessions.refresh(session, at).await;
            gw.metrics.tunnel_refreshes.inc();
        }
        for due in gw.tunnels.due(now, all) {
            match gw.sessions.recheck(due.session, now).await {
                Ok(next) => gw.tunnels.extend(due.tunnel, next),
                Err(why) => gw.tunnels.end(due.tunnel, why),
            }
        }
    }
}

/// Deletes expired sessions and old audit events every few minutes, so neither grows without bound.
async fn sweep(gw: Arc<arc_swap::ArcSwap<Gateway>>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(300));
    loop {
        tick.tick().await;
        let gw = gw.load_full();
        let s = &gw.config.session;
        let now = gw.clock.now();
        if let Err(e) = gw.store.purge_sessions(now, s.idle_timeout.secs(), s.max_lifetime.secs()).await {
            tracing::warn!(error = %e, "session sweep failed");
        }
        let before = now.saturating_sub(gw.config.audit.retention.secs());
        if let Err(e) = gw.store.purge_audit(before).await {
            tracing::warn!(error = %e, "audit sweep failed");
        }
    }
}
