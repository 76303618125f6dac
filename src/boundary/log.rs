//! The native log queue as Python drains it (see `crate::log`).

use pyo3::prelude::*;

/// The records queued so far, as `(level, message)` pairs.
#[pyfunction]
pub fn take_log_records() -> Vec<(u8, String)> {
    crate::log::take().into_iter().map(|record| (record.level as u8, record.message)).collect()
}
