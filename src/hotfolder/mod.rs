//! The hot folder: the only code that renames files. [`publish`] writes outputs
//! atomically and never replaces an existing file.

pub mod publish;
