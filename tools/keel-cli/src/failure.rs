//! How `keel` fails: an exit code per kind of failure, and the error as JSON under `--json`.
//!
//! | exit code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the command failed (the message says why) |
//! | 2 | `keel health` found something unhealthy |
//! | 3 | cannot connect to the nodes |
//! | 64 | bad arguments (`EX_USAGE`): an unknown flag, a bad value, a refused setting |

use std::fmt;
use std::process::ExitCode;

use serde::Serialize;

/// A failure with its kind.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Health checks failed (their report was printed).
    Unhealthy,
    /// The nodes could not be reached.
    Connect(String),
    /// The arguments were refused.
    Usage(String),
    /// Anything else.
    Other(String),
}

impl Failure {
    /// The process's exit code.
    pub(crate) fn code(&self) -> u8 {
        match self {
            Failure::Other(_) => 1,
            Failure::Unhealthy => 2,
            Failure::Connect(_) => 3,
            Failure::Usage(_) => 64,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Failure::Other(_) => "failed",
            Failure::Unhealthy => "unhealthy",
            Failure::Connect(_) => "cannot_connect",
            Failure::Usage(_) => "bad_arguments",
        }
    }

    /// Sorts an error from building the store.
    pub(crate) fn of_setup(error: keel_scylla::Error) -> Failure {
        use keel_scylla::Error as E;
        let message = error.to_string();
        match error {
            E::Connect { .. } | E::ConnectTimeout { .. } => Failure::Connect(message),
            E::InvalidIdentifier { .. } | E::InvalidSetting { .. } | E::NoNodes => {
                Failure::Usage(message)
            }
            _ => Failure::Other(message),
        }
    }

    /// Prints the failure (JSON on stdout under `--json`, text on stderr otherwise) and
    /// returns the exit code.
    pub(crate) fn report(self, json: bool) -> ExitCode {
        let code = self.code();
        if matches!(self, Failure::Unhealthy) {
            return ExitCode::from(code); // the health report said it all
        }
        if json {
            let body = JsonError {
                error: ErrorBody {
                    kind: self.kind(),
                    message: self.to_string(),
                    exit_code: code,
                },
            };
            match serde_json::to_string_pretty(&body) {
                Ok(text) => println!("{text}"),
                Err(_) => eprintln!("keel: {self}"),
            }
        } else {
            eprintln!("keel: {self}");
        }
        ExitCode::from(code)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Unhealthy => f.write_str("unhealthy"),
            Failure::Connect(m) | Failure::Usage(m) | Failure::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

impl From<Box<dyn std::error::Error>> for Failure {
    fn from(error: Box<dyn std::error::Error>) -> Self {
        match error.downcast::<Failure>() {
            Ok(failure) => *failure,
            Err(other) => Failure::Other(other.to_string()),
        }
    }
}

/// `{"error": {...}}`, what `--json` prints on failure.
#[derive(Serialize)]
struct JsonError {
    error: ErrorBody,
}

#[derive(Serialize)]
struct ErrorBody {
    kind: &'static str,
    message: String,
    exit_code: u8,
}
