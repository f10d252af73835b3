//! Failure counters and notice throttles.

use super::*;

impl RedbStore {
    pub(in crate::store) fn update_failures(
        &self,
        key: &str,
        next: impl FnOnce(Option<Failures>) -> Failures,
    ) -> Result<Failures, StoreError> {
        self.write(|tx| {
            let mut table = tx.open_table(FAILURES)?;
            let old = table.get(key)?.map(|v| decode::<Failures>(v.value())).transpose()?;
            let f = next(old);
            table.insert(key, encode(&f)?.as_slice())?;
            Ok(f)
        })
    }

    pub(in crate::store) fn locked_until(&self, keys: &[String], now: u64) -> Result<Option<u64>, StoreError> {
        let tx = self.db()?.begin_read()?;
        let table = tx.open_table(FAILURES)?;
        let mut until = None;
        for key in keys {
            if let Some(v) = table.get(key.as_str())? {
                let f: Failures = decode(v.value())?;
                if f.locked_until > now {
                    until = until.max(Some(f.locked_until));
                }
            }
        }
        Ok(until)
    }

    pub(in crate::store) fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(FAILURES)?.remove(key)?;
            Ok(())
        })
    }

    pub(in crate::store) fn claim_interval(&self, key: &str, now: u64, interval: u64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let mut t = tx.open_table(THROTTLE)?;
            let last = t.get(key)?.map(|v| v.value());
            if last.is_some_and(|l| now < l.saturating_add(interval)) {
                return Ok(false);
            }
            t.insert(key, now)?;
            Ok(true)
        })
    }
}
