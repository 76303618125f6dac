//! Python exception types raised by the native module.

use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionError, PyValueError};

create_exception!(_native, ClientDisconnected, PyConnectionError, "The client went away before the exchange finished.");
create_exception!(_native, BodyTooLarge, PyValueError, "The request body is larger than the server's max_body_size.");
create_exception!(_native, TlsConfigError, PyValueError, "A certificate, key or password could not be used.");
