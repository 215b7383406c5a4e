//! Errors that stop a run before it starts (bad configuration, unusable schedule).
//! Per-request failures are not errors: they are recorded with an `ErrorKind`.

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    #[error("invalid endpoint {url:?}: {reason}")]
    InvalidEndpoint { url: String, reason: String },
    #[error("schedule not accepted: {0}")]
    InputClosed(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            context: context.into(),
            source,
        }
    }
}
