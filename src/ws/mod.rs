//! WebSocket layer: the HTTP/1.1 upgrade decision ([`upgrade`]) and the RFC 6455 frame codec
//! ([`frame`]). Both are sans-IO: they read from and write to buffers the caller owns, so a
//! connection holds no read or write buffer while idle.

pub mod demo;
pub mod frame;
pub mod upgrade;
