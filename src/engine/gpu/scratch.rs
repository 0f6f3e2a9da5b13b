//! The buffers of a search in flight, pooled and grown, never made per search; a
//! submitted batch waiting for its results.

use super::*;

/// The buffers of one search in flight, kept in a pool and grown (to powers of two)
/// when a batch needs more: never made per search.
pub(super) struct Scratch {
    /// Unique among the scratch sets this process made.
    pub(super) id: u64,
    /// Changes whenever one of its buffers is replaced.
    pub(super) generation: u64,
    pub(super) probes: Option<wgpu::Buffer>,
    pub(super) scales: Option<wgpu::Buffer>,
    pub(super) lists: Option<wgpu::Buffer>,
    pub(super) best: Option<wgpu::Buffer>,
    /// The two-stage path's score buffers, used by alternate chunks.
    pub(super) scores: [Option<wgpu::Buffer>; 2],
    pub(super) params: Option<wgpu::Buffer>,
    pub(super) readback: Option<wgpu::Buffer>,
    /// Timestamp queries (when the device has them) and where they are resolved.
    pub(super) queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    /// Bound where a gallery has no row scales (f32, f16).
    pub(super) no_scales: Option<wgpu::Buffer>,
}

pub(super) static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(1);

impl Scratch {
    pub(super) fn new() -> Scratch {
        Scratch {
            id: NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed),
            generation: NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed),
            probes: None,
            scales: None,
            lists: None,
            best: None,
            scores: [None, None],
            params: None,
            readback: None,
            queries: None,
            no_scales: None,
        }
    }
}

/// `slot`'s buffer, replaced by one of at least `size` bytes (a power of two) when
/// it is smaller; a replacement changes the scratch set's generation.
pub(super) fn ensure(
    ctx: &GpuContext,
    slot: &mut Option<wgpu::Buffer>,
    generation: &mut u64,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    if slot.as_ref().is_none_or(|b| b.size() < size) {
        *slot = Some(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(BINDING_ALIGN).next_power_of_two(),
            usage,
            mapped_at_creation: false,
        }));
        *generation = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
    }
    slot.clone().expect("just ensured")
}

/// A submitted batch waiting for its results.
pub(super) struct Pending {
    pub(super) scratch: Scratch,
    pub(super) plan: Plan,
    pub(super) index: wgpu::SubmissionIndex,
    pub(super) mapped: Arc<AtomicU8>,
}

/// How long a finished submission's readback may take to be mapped.
pub(super) const MAP_WAIT: Duration = Duration::from_secs(10);

/// Set by the readback's map callback.
pub(super) const MAPPED: u8 = 1;

pub(super) const MAP_FAILED: u8 = 2;
