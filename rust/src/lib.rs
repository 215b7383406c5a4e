//! fineserve's engine: open-loop dispatch of a columnar schedule with per-event timing,
//! and an embedded OpenAI-compatible mock server. The Python bindings live in `python`
//! (feature `python`), so `cargo test` needs no libpython.

mod chunk_scan;
pub mod client;
pub mod engine;
pub mod error;
pub mod limits;
pub mod mock;
pub mod mock_media;
pub mod mock_metrics;
pub mod records;
mod recv_stamp;
pub mod reply;
pub mod sse;
pub mod timer;
pub mod tls;

#[cfg(feature = "python")]
mod python;

pub use engine::{start, start_streaming, EngineConfig, RunHandle, RunOutput, Schedule};
pub use error::EngineError;
pub use mock::{MockConfig, MockServer};
pub use records::{ErrorKind, RecordColumns};
