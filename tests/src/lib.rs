//! e2e lab
