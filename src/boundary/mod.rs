//! The Python boundary: the native server object, the request object handed
//! to the loop thread, the event queue between tokio and asyncio, and the
//! per-interface glue that is faster built natively.

pub mod asgi;
pub mod bridge;
pub mod direct;
pub mod log;
pub mod queue;
pub mod request;
pub mod server;
pub mod wsgi;
