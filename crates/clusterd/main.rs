//! The clusterd binary: daemon and CLI client.
fn main() {}
