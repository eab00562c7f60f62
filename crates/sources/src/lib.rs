//! Where the data path's config comes from: config sources (the folder of Istio YAML, and
//! the control plane over xDS) hand their sets to one [`Publisher`], which builds the
//! snapshot off the data path, swaps it in whole and reports status and readiness. [`check`] is
//! `portcullis check`'s findings and summary, as data.

mod check;
mod folder;
mod publisher;
mod registry;
mod xds;

pub use check::{Report, check};
pub use folder::Folder;
pub use publisher::{
    Built, Compile, CompileError, Delivery, Outcome, Publisher, Set, SourceId, Trigger, rebuild_on,
};
pub use registry::RegistryCompiler;
pub use xds::XdsSource;

#[cfg(test)]
mod testing;
