//! The wgpu device biogate computes on: instance and adapter chosen from the
//! environment, limits taken from the adapter, optional features when present, and
//! device errors turned into [`Error`]s instead of panics. TIMESTAMP_QUERY is used when
//! present (kernel time in `biogate bench`). Cooperative matrices (tensor cores) are
//! asked for only when the caller wants them (`BIOGATE_GPU_COOPERATIVE=1`) and the
//! adapter offers 16 x 16 x 16 f16 matrices with f32 accumulation: they are an
//! experimental wgpu feature, used by the f16 scan alone.
//!
//! Environment (wgpu's own names): `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`)
//! restricts the backends tried; `WGPU_ADAPTER_NAME` picks the first adapter whose name
//! contains it (case-insensitive); otherwise the high-performance adapter is used.

use crate::error::{Error, GpuErrorKind, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Device, queue and what the adapter allows.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    /// The f16 tensor-core scan may run here.
    pub cooperative: bool,
    lost: Arc<AtomicBool>,
}

fn gpu_error(kind: GpuErrorKind, what: impl std::fmt::Display) -> Error {
    Error::gpu(kind, what.to_string())
}

impl GpuContext {
    /// Open the adapter the environment asks for; `Ok(None)` when there is none. With
    /// `cooperative`, cooperative matrices are turned on where the adapter has them.
    pub fn open(cooperative: bool) -> Result<Option<GpuContext>> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            Ok(wanted) => {
                let wanted = wanted.to_lowercase();
                let adapters = pollster::block_on(instance.enumerate_adapters(backends));
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                match adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
                {
                    Some(a) => a,
                    None => {
                        return Err(gpu_error(
                            GpuErrorKind::NotAvailable,
                            format!("WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters found: {names:?}"),
                        ));
                    }
                }
            }
            Err(_) => {
                let options = wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                };
                match pollster::block_on(instance.request_adapter(&options)) {
                    Ok(a) => a,
                    Err(_) => return Ok(None),
                }
            }
        };
        GpuContext::on_adapter(&adapter, cooperative).map(Some)
    }

    fn on_adapter(adapter: &wgpu::Adapter, cooperative: bool) -> Result<GpuContext> {
        let info = adapter.get_info();
        let offered = adapter.limits();
        // Ask for what the adapter has where it matters (wgpu grants exactly what is
        // asked for, and its defaults are far below what GPUs offer).
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: offered.max_storage_buffer_binding_size,
            max_buffer_size: offered.max_buffer_size,
            max_compute_workgroup_storage_size: offered.max_compute_workgroup_storage_size,
            max_storage_buffers_per_shader_stage: offered.max_storage_buffers_per_shader_stage,
            ..wgpu::Limits::downlevel_defaults().using_resolution(offered.clone())
        };
        // Kernel timing when the adapter can. The kernels need nothing optional: f16 rows
        // are widened exactly to f32 with unpack2x16float (what the CPU engine computes),
        // and dot4I8Packed is core WGSL. What the card offers beyond that is logged.
        let offered_features = adapter.features();
        let coop_features =
            wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let coop_f16 = offered_features.contains(coop_features)
            && adapter.cooperative_matrix_properties().iter().any(|p| {
                (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            });
        let cooperative = cooperative && coop_f16;
        let mut features = offered_features & wgpu::Features::TIMESTAMP_QUERY;
        if cooperative {
            features |= coop_features;
        }
        tracing::info!(
            adapter = %info.name,
            shader_f16 = offered_features.contains(wgpu::Features::SHADER_F16),
            subgroup = offered_features.contains(wgpu::Features::SUBGROUP),
            cooperative_matrix = offered_features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            cooperative_f16 = coop_f16,
            cooperative_on = cooperative,
            timestamp_query = offered_features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_binding = offered.max_storage_buffer_binding_size,
            workgroup_memory = offered.max_compute_workgroup_storage_size,
            "GPU adapter"
        );
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("biogate"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: the experimental feature (cooperative matrices) is only asked for
            // when the user turned it on; wgpu's own validation still applies to it.
            experimental_features: if cooperative {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        }))
        .map_err(|e| {
            gpu_error(
                GpuErrorKind::NotAvailable,
                format!("opening {} ({:?}): {e}", info.name, info.backend),
            )
        })?;
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            flag.store(true, Ordering::SeqCst);
            tracing::error!(?reason, %message, "GPU device lost");
        });
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            tracing::error!(error = %e, "uncaptured GPU error");
        }));
        tracing::info!(adapter = %info.name, backend = ?info.backend, driver = %info.driver, "GPU opened");
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            features,
            cooperative,
            lost,
        })
    }

    /// The card's name and how it is reached, for reports.
    pub fn describe(&self) -> String {
        let driver = if self.info.driver.is_empty() {
            String::new()
        } else {
            format!(", {} {}", self.info.driver, self.info.driver_info)
        };
        let coop = if self.cooperative {
            "; f16 on cooperative matrices"
        } else {
            ""
        };
        format!("{} ({:?}{driver}{coop})", self.info.name, self.info.backend)
    }

    /// Fails once the device is lost.
    pub fn check_alive(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(gpu_error(
                GpuErrorKind::DeviceLost,
                format!("the GPU device {} was lost", self.info.name),
            ));
        }
        Ok(())
    }

    /// Run `f`, turning validation and out-of-memory errors it causes into an error.
    pub fn checked<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        self.check_alive()?;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if v.is_some() || o.is_some() {
            // A lost device shows up as invalid objects first: let its callback run.
            let _ = self.device.poll(wgpu::PollType::Poll);
        }
        self.check_alive()?;
        let failed = o
            .map(|e| (GpuErrorKind::OutOfMemory, e))
            .or(v.map(|e| (GpuErrorKind::Internal, e)));
        if let Some((kind, e)) = failed {
            // wgpu's messages span lines ("Caused by: ..."): keep them on one.
            let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
            return Err(gpu_error(kind, format!("{what}: {text}")));
        }
        Ok(out)
    }

    /// Block until the queue is idle.
    pub fn wait(&self) -> Result<()> {
        self.poll(wgpu::PollType::wait_indefinitely())
    }

    /// Block until submission `index` has run and its callbacks (buffer maps) are done;
    /// later submissions (other searches) may still be running.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.poll(wgpu::PollType::Wait {
            submission_index: Some(index),
            timeout: None,
        })
    }

    fn poll(&self, how: wgpu::PollType) -> Result<()> {
        self.device.poll(how).map_err(|e| {
            // A submission refused by a lost device shows up here first: let the
            // device-lost callback run before telling the two apart.
            let _ = self.device.poll(wgpu::PollType::Poll);
            let kind = match e {
                wgpu::PollError::Timeout => GpuErrorKind::Timeout,
                _ if self.lost.load(Ordering::SeqCst) => GpuErrorKind::DeviceLost,
                _ => GpuErrorKind::Internal,
            };
            gpu_error(kind, format!("waiting for the GPU: {e}"))
        })?;
        self.check_alive()
    }
}
