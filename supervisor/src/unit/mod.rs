//! Unit files: the TOML schema, validation, and diagnostics that name the file,
//! line, column, key and the fix. Knows nothing of processes or sockets.

pub mod model;

pub use model::*;
