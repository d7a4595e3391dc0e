//! The data path: one accept loop per port (`listener`), one task per client (`client`) that
//! reads only the first packet, and the byte copy between client and backend (`splice`).

pub mod client;
pub mod listener;
pub mod splice;
