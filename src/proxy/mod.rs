//! The data path: one accept loop per port (`listener`), one task per client (`client`) that
//! reads only the first packet (and the next one after a declined SSL/GSS request), the byte copy
//! between client and backend (`splice`), the TLS affinity table (`affinity`), and the
//! threads all of that runs on (`workers`).

pub mod affinity;
pub mod client;
pub mod listener;
pub mod splice;
pub mod workers;

use serde::{Deserialize, Serialize};

/// Which listener a session came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortRole {
    Write,
    Read,
}

impl PortRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PortRole::Write => "write",
            PortRole::Read => "read",
        }
    }
}
