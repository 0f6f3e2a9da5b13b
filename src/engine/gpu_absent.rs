//! The GPU backend's stand-in when biogate is built without the `gpu` feature: there is
//! never a GPU. `--backend auto` then searches on the CPU; `--backend gpu` says why not.

use super::{Backend, EncodedProbes, Hit};
use crate::error::{Error, GpuErrorKind, Result};
use crate::gallery::Slab;
use std::convert::Infallible;

pub use super::gpu_options::{GpuOptions, KernelTimes, Pipeline, Upload};

/// A GPU backend that cannot exist in this build.
pub struct GpuBackend {
    never: Infallible,
}

impl GpuBackend {
    /// There is no GPU in a build without the `gpu` feature.
    pub fn open(_: GpuOptions) -> Result<Option<GpuBackend>> {
        Ok(None)
    }

    /// Says why there is no GPU.
    pub fn require(_: GpuOptions) -> Result<GpuBackend> {
        Err(Error::gpu(
            GpuErrorKind::NotAvailable,
            "this biogate was built without the `gpu` feature",
        ))
    }

    pub fn describe(&self) -> String {
        match self.never {}
    }

    pub fn is_software(&self) -> bool {
        match self.never {}
    }

    pub fn last_kernel_times(&self) -> Option<KernelTimes> {
        match self.never {}
    }

    pub fn last_upload(&self) -> Option<Upload> {
        match self.never {}
    }

    pub fn resident_bytes(&self) -> u64 {
        match self.never {}
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn search_slab(&self, _: &Slab<'_>, _: &EncodedProbes, _: usize, _: f32) -> Result<Vec<Vec<Hit>>> {
        match self.never {}
    }
}
