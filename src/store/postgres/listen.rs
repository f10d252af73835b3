//! The connection side: TLS for the server connection, and the LISTEN loop that hears other instances'
//! revocations (NOTIFY), with a periodic revision poll as the fallback, and the batched last-seen writes.

use super::*;

pub(super) fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(db)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Keeps a dedicated LISTEN connection: each notification (and every [`POLL`]) reads the revision and the journal
/// steps past it ([`PgStore::catch_up`]); each
/// reconnect bumps the epoch so caches are flushed for whatever was missed meanwhile.
pub(super) async fn listen(
    pg: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    store: std::sync::Weak<PgStore>,
) {
    use futures_util::StreamExt;
    loop {
        let Some(s) = store.upgrade() else { return };
        let connected = pg.connect(tls.clone()).await;
        let (client, mut conn) = match connected {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "revocation listener cannot connect; retrying");
                drop(s);
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        let (notify_tx, mut notify_rx) = tokio::sync::mpsc::channel::<()>(16);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                        let _ = notify_tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        if client.batch_execute("LISTEN portcullis").await.is_err() {
            driver.abort();
            continue;
        }
        // Reconnected: whatever happened while we were away is unknown, so flush.
        s.revision.fetch_add(EPOCH, Ordering::AcqRel);
        drop(s);
        loop {
            let woke = tokio::time::timeout(POLL, notify_rx.recv()).await;
            if matches!(woke, Ok(None)) || driver.is_finished() {
                break;
            }
            let Some(s) = store.upgrade() else { return };
            if s.catch_up(&client).await.is_err() {
                break;
            }
        }
        driver.abort();
        tracing::warn!("revocation listener lost its connection; reconnecting");
    }
}

/// Writes batched last-seen refreshes every few seconds.
pub(super) async fn flush_touches(store: std::sync::Weak<PgStore>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(s) = store.upgrade() else { return };
        if let Err(e) = s.flush().await {
            tracing::warn!(error = %e, "could not write session last-seen batch");
        }
    }
}
