//! placeholder, replaced as the crate is built
