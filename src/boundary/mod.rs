//! The Python boundary: the native server object, the request object handed
//! to the loop thread, and the event queue between tokio and asyncio.

pub mod bridge;
pub mod direct;
pub mod queue;
pub mod request;
pub mod server;
