//! Failure counters and notice throttles: small rows updated under a row lock, never a revocation.

use super::*;

impl PgStore {
    pub(in crate::store) async fn update_failures(
        &self,
        key: &str,
        next: impl FnOnce(Option<Failures>) -> Failures + Send,
    ) -> Result<Failures, StoreError> {
        // One statement creates the row if missing and locks it either way (ON CONFLICT DO UPDATE takes the row
        // lock), so concurrent failures on one key queue up, none is lost, and a concurrent clear waits for us.
        // A fresh row holds count 0, which no stored counter has (the rule always counts at least 1).
        // A counter is no revocation: no revision bump and no cache flush (unlike pg_tx).
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        let row = tx
            .query_one(
                "INSERT INTO failures AS f (key, count, window_start, locked_until) VALUES ($1, 0, 0, 0)
                 ON CONFLICT (key) DO UPDATE SET key = f.key
                 RETURNING count, window_start, locked_until",
                &[&key],
            )
            .await
            .map_err(db)?;
        let count = u32::try_from(row.get::<_, i32>(0)).unwrap_or(0);
        let old = (count > 0).then(|| Failures { count, window_start: u(row.get(1)), locked_until: u(row.get(2)) });
        let f = next(old);
        tx.execute(
            "UPDATE failures SET count = $2, window_start = $3, locked_until = $4 WHERE key = $1",
            &[&key, &i32::try_from(f.count).unwrap_or(i32::MAX), &i(f.window_start), &i(f.locked_until)],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(f)
    }

    pub(in crate::store) async fn locked_until(&self, keys: &[String], now: u64) -> Result<Option<u64>, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT max(locked_until) FROM failures WHERE key = ANY($1) AND locked_until > $2",
                &[&keys, &i(now)],
            )
            .await
            .map_err(db)?;
        Ok(row.get::<_, Option<i64>>(0).map(u))
    }

    pub(in crate::store) async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        c.execute("DELETE FROM failures WHERE key = $1", &[&key]).await.map_err(db)?;
        Ok(())
    }

    pub(in crate::store) async fn claim_interval(
        &self,
        key: &str,
        now: u64,
        interval: u64,
    ) -> Result<bool, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "INSERT INTO throttle AS t (key, last) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET last = $2 WHERE t.last + $3 <= $2
                 RETURNING last",
                &[&key, &i(now), &i(interval)],
            )
            .await
            .map_err(db)?;
        Ok(row.is_some())
    }
}
