//! The data path: one accept loop per port (`listener`), one task per client (`client`) that
//! reads only the first packet, the byte copy between client and backend (`splice`), and the
//! threads all of that runs on (`workers`).

pub mod client;
pub mod listener;
pub mod splice;
pub mod workers;
