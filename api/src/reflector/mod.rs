//! The reflector's interface to whoever starts and watches it: its command line and
//! environment ([`config`]), how a launcher writes them and reads the start-up banner
//! ([`launch`]), and the `GET /sessions` report ([`sessions`]). `refleet-reflector` parses this
//! command line; the operator's pod builder and `refleet up` write it, so the operator never
//! depends on the reflector crate itself.

pub mod config;
pub mod launch;
pub mod sessions;
