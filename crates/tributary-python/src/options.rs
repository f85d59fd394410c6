//! The constructor's options, checked: a bad one is a `ValueError` naming it and its range.

use std::time::Duration;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyFloat, PyInt};

use crate::convert::type_name;

/// Default `batch_size`, as the SDK's (`BatchEventProcessor._DEFAULT_BATCH_SIZE`).
pub(crate) const DEFAULT_BATCH_SIZE: usize = 10;
/// Default `flush_interval`, as the SDK's: 30 s.
pub(crate) const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(30);
/// Default `timeout_interval` (the close timeout), as the SDK's: 5 s.
pub(crate) const DEFAULT_TIMEOUT_INTERVAL: Duration = Duration::from_secs(5);
/// Default `queue_capacity`, Tributary's: a burst of 10,000 events fits (the SDK: 1,000).
pub(crate) const DEFAULT_QUEUE_CAPACITY: usize = 10_000;

pub(crate) const MAX_BATCH_SIZE: usize = 10_000;
pub(crate) const MAX_QUEUE_CAPACITY: usize = 10_000_000;
pub(crate) const MAX_INTERVAL_S: f64 = 86_400.0;
pub(crate) const MAX_RETRY_ATTEMPTS: u32 = 100;

/// An integer option in `lo..=hi`; `None` takes `default`.
pub(crate) fn int_option(
    name: &str,
    v: Option<&Bound<'_, PyAny>>,
    default: usize,
    lo: usize,
    hi: usize,
) -> PyResult<usize> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(default);
    };
    let bad = || {
        PyValueError::new_err(format!(
            "{name} must be an integer from {lo} to {hi}, got {}",
            repr(v)
        ))
    };
    if v.cast::<PyBool>().is_ok() || v.cast::<PyInt>().is_err() {
        return Err(bad());
    }
    match v.extract::<i64>() {
        Ok(n) if n >= lo as i64 && n <= hi as i64 => Ok(n as usize),
        _ => Err(bad()),
    }
}

/// A duration in seconds (int or float) in `lo..=hi` (`lo` excluded when `open_low`).
pub(crate) fn seconds_option(
    name: &str,
    v: Option<&Bound<'_, PyAny>>,
    default: Duration,
    open_low: bool,
) -> PyResult<Duration> {
    let Some(v) = v.filter(|v| !v.is_none()) else {
        return Ok(default);
    };
    let range = if open_low {
        "more than 0 and at most 86400"
    } else {
        "from 0 to 86400"
    };
    let bad = || {
        PyValueError::new_err(format!(
            "{name} must be a number of seconds {range}, got {}",
            repr(v)
        ))
    };
    if v.cast::<PyBool>().is_ok() || (v.cast::<PyInt>().is_err() && v.cast::<PyFloat>().is_err()) {
        return Err(bad());
    }
    let s: f64 = v.extract().map_err(|_| bad())?;
    let low_ok = if open_low { s > 0.0 } else { s >= 0.0 };
    if !(low_ok && s <= MAX_INTERVAL_S && s.is_finite()) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(s))
}

/// An optional string option.
pub(crate) fn str_option(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match v.filter(|v| !v.is_none()) {
        None => Ok(None),
        Some(v) => v.extract::<String>().map(Some).map_err(|_| {
            PyTypeError::new_err(format!("{name} must be a str, got {}", type_name(v)))
        }),
    }
}

fn repr(v: &Bound<'_, PyAny>) -> String {
    v.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| type_name(v))
}
