//! Built-in VMM.
