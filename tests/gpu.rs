//! The GPU backend (the real WGSL, on whatever adapter wgpu finds: lavapipe in CI)
//! against the float64 / exact-integer reference and against the CPU engine, on odd
//! sizes, with tiny shards so that every gallery spans several of them.
//!
//! Without an adapter these tests print a notice and pass, unless
//! `BIOGATE_REQUIRE_GPU=1` (CI sets it), in which case they fail.
#![cfg(feature = "gpu")]

mod common;

use biogate::engine::gpu::{GpuBackend, GpuOptions, Pipeline};
use biogate::error::GpuErrorKind;
use biogate::gallery::{Enrollment, Gallery, ImportOptions};
use biogate::npy::MemoryImport;
use biogate::template::Dtype;
use biogate::{Engine, SearchParams};
use common::{Model, build, check_engine, random_rows, rng};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Shards of at most 4 KiB, but at least one 64-row tile: every gallery of more than
/// 64 rows here spans several shards.
const SHARD_BYTES: u64 = 4096;

/// One GPU shared by the tests of this binary (kernels compile once per shape).
fn gpu() -> Option<Arc<GpuBackend>> {
    static GPU: OnceLock<Option<Arc<GpuBackend>>> = OnceLock::new();
    GPU.get_or_init(open_gpu).clone()
}

/// A GPU backend of its own (for tests that count what is resident).
fn open_gpu() -> Option<Arc<GpuBackend>> {
    open_gpu_with(GpuOptions {
        max_shard_bytes: Some(SHARD_BYTES),
        ..GpuOptions::default()
    })
}

/// `BIOGATE_GPU_COOPERATIVE=1` turns the tensor-core kernels on for every test (on a
/// card that has them; lavapipe has none).
fn open_gpu_with(mut options: GpuOptions) -> Option<Arc<GpuBackend>> {
    options.cooperative |= std::env::var("BIOGATE_GPU_COOPERATIVE").as_deref() == Ok("1");
    {
        match GpuBackend::open(options) {
            Ok(Some(g)) => {
                eprintln!("GPU tests on {}", g.describe());
                Some(Arc::new(g))
            }
            Ok(None) if std::env::var("BIOGATE_REQUIRE_GPU").as_deref() == Ok("1") => {
                panic!("BIOGATE_REQUIRE_GPU=1 but no GPU adapter was found (install mesa-vulkan-drivers for lavapipe)")
            }
            Ok(None) => {
                eprintln!(
                    "NOTICE: no GPU adapter found; GPU tests skipped (set BIOGATE_REQUIRE_GPU=1 to fail instead)"
                );
                None
            }
            Err(e) => panic!("opening the GPU failed: {e}"),
        }
    }
}

fn gpu_engine() -> Option<Engine> {
    gpu().map(|g| Engine::new(g))
}

#[test]
fn gpu_matches_reference_and_cpu_on_odd_sizes() {
    let Some(engine) = gpu_engine() else { return };
    for dtype in Dtype::ALL {
        // 2057 and 300 rows: 33 and 5 shards of one 64-row tile each.
        for (dim, rows) in [(1, 40), (17, 2057), (513, 300), (64, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let (g, model) = build(dir.path(), dim, dtype, rows, dim as u64 * 31 + rows as u64);
            for batch in [1, 9, 37] {
                let probes = random_rows(&mut rng(batch as u64), batch, dim);
                check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
                same_as_cpu(&engine, &g, &probes, dtype);
            }
        }
    }
}

/// How far a float score may be from the CPU engine's: 1e-5, or 1e-4 for f16 with the
/// tensor cores on (the fused tensor-core scan rounds probes to f16: 3.4e-5 on a card).
fn float_tolerance(dtype: Dtype) -> f32 {
    let cooperative = std::env::var("BIOGATE_GPU_COOPERATIVE").as_deref() == Ok("1");
    if dtype == Dtype::F16 && cooperative { 1e-4 } else { 1e-5 }
}

/// i8: the very same lists and score bits as the CPU engine; floats: the same subjects
/// in the same order wherever the scores are not within rounding of each other.
fn same_as_cpu(engine: &Engine, g: &Gallery, probes: &[f32], dtype: Dtype) {
    let snapshot = g.snapshot();
    for k in [1, 7, 100] {
        let params = SearchParams { k, threshold: None };
        let gpu = engine.search(&snapshot, probes, &params).unwrap();
        let cpu = Engine::cpu().search(&snapshot, probes, &params).unwrap();
        for (q, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
            assert_eq!(a.candidates.len(), b.candidates.len(), "probe {q}, k {k}: list length");
            for (rank, (x, y)) in a.candidates.iter().zip(&b.candidates).enumerate() {
                match dtype {
                    Dtype::I8 => assert!(
                        x.subject == y.subject && x.score.to_bits() == y.score.to_bits(),
                        "probe {q}, rank {rank}, k {k}: GPU {x:?} vs CPU {y:?}"
                    ),
                    _ => {
                        let tolerance = float_tolerance(dtype);
                        assert!(
                            (x.score - y.score).abs() <= tolerance,
                            "probe {q}, rank {rank}, k {k}: GPU {x:?} vs CPU {y:?}"
                        );
                        // The same subject, unless rounding reordered a near tie: then the
                        // GPU's subject stands elsewhere in the CPU's list with a score
                        // within rounding of this rank's (or just past its end).
                        let near = |score: f32| (score - y.score).abs() <= 2.0 * tolerance;
                        let swapped = b.candidates.iter().any(|c| c.subject == x.subject && near(c.score))
                            || (b.candidates.iter().all(|c| c.subject != x.subject)
                                && near(b.candidates.last().expect("same length").score));
                        assert!(
                            x.subject == y.subject || swapped,
                            "probe {q}, rank {rank}, k {k}: GPU {x:?} vs CPU {y:?} (not a near tie)"
                        );
                    }
                }
            }
        }
    }
}

/// Every kernel shape (batches from 1 to 70 probes pick every blocking, and batches
/// that do not fill their last tile), with scan blocks of one tile and merge trees of
/// fan-in 2 (many levels), over shards of several blocks: the same answers as the
/// reference and the CPU engine, k from 1 to 100, with deletions and several
/// templates per subject (see `build`).
#[test]
fn every_kernel_shape_and_deep_merge_trees_match_the_cpu() {
    let Some(gpu) = open_gpu_with(GpuOptions {
        max_shard_bytes: Some(48 * 1024),
        max_rows_per_block: Some(64),
        merge_fan: Some(2),
        ..GpuOptions::default()
    }) else {
        return;
    };
    let engine = Engine::new(gpu);
    for dtype in Dtype::ALL {
        let dim = 37;
        let dir = tempfile::tempdir().unwrap();
        let (g, model) = build(dir.path(), dim, dtype, 1500, 77);
        for batch in [1, 2, 3, 4, 5, 8, 13, 16, 17, 32, 33, 70] {
            let probes = random_rows(&mut rng(batch as u64 + 500), batch, dim);
            check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
            same_as_cpu(&engine, &g, &probes, dtype);
        }
    }
}

#[test]
fn resident_copy_follows_enrollments_deletions_and_compaction() {
    let Some(gpu) = open_gpu() else { return };
    let engine = Engine::new(gpu.clone());
    for dtype in Dtype::ALL {
        let dim = 17;
        let dir = tempfile::tempdir().unwrap();
        let (mut g, mut model) = build(dir.path(), dim, dtype, 700, 11);
        let probes = random_rows(&mut rng(12), 5, dim);
        check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
        let resident = gpu.resident_bytes();
        // New subjects (ids sorting before and after the others) and more rows for old
        // ones go to the log: appended on the GPU, ranks rewritten.
        let mut r = rng(13);
        for (i, subject) in ["a-first", "zz-last", model.subjects()[2].as_str()].iter().enumerate() {
            let t = random_rows(&mut r, 1 + i, dim);
            g.enroll(&[Enrollment {
                subject: subject.to_string(),
                templates: t.clone(),
            }])
            .unwrap();
            model.add(subject, &t, dim);
            check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
        }
        // Deletions in segments (tombstones) and in the log; a probe equal to a deleted
        // template must not find it.
        for victim in [model.subjects()[5].clone(), "a-first".to_string()] {
            g.delete_subject(&victim).unwrap();
            model.delete(&victim);
            check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
        }
        // Compaction replaces every segment: the old resident copies are dropped, so
        // what stays resident is exactly what a fresh GPU holds for the compacted gallery.
        g.compact().unwrap();
        check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
        let fresh = open_gpu().expect("a second device on the same adapter");
        Engine::new(fresh.clone())
            .search(&g.snapshot(), &probes, &SearchParams { k: 1, threshold: None })
            .unwrap();
        assert_eq!(
            gpu.resident_bytes(),
            fresh.resident_bytes(),
            "only the compacted gallery stays resident ({resident} bytes were resident before)"
        );
    }
}

#[test]
fn many_templates_per_subject_and_ties() {
    let Some(engine) = gpu_engine() else { return };
    ties_and_many_templates_per_subject(&engine);
}

fn ties_and_many_templates_per_subject(engine: &Engine) {
    for dtype in Dtype::ALL {
        let dim = 24;
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), dim, dtype).unwrap();
        let mut model = Model::default();
        let mut r = rng(21);
        // One subject with 40 templates, 30 with one each, and 12 ids sharing one
        // template (every score ties) split between a segment and the log.
        let crowd = random_rows(&mut r, 40, dim);
        let mut ids: Vec<String> = vec!["crowd".to_string(); 40];
        let mut values = crowd.clone();
        let singles = random_rows(&mut r, 30, dim);
        ids.extend((0..30).map(|i| format!("single-{i:02}")));
        values.extend_from_slice(&singles);
        let twin = random_rows(&mut r, 1, dim);
        for i in (0..12).step_by(2) {
            ids.push(format!("twin-{i:02}"));
            values.extend_from_slice(&twin);
        }
        g.import(
            &mut MemoryImport::new(dim, &values, &ids).unwrap(),
            ImportOptions::default(),
            &|_| {},
        )
        .unwrap();
        for (i, s) in ids.iter().enumerate() {
            model.add(s, &values[i * dim..(i + 1) * dim], dim);
        }
        for i in (1..12).step_by(2) {
            let s = format!("twin-{i:02}");
            g.enroll(&[Enrollment {
                subject: s.clone(),
                templates: twin.clone(),
            }])
            .unwrap();
            model.add(&s, &twin, dim);
        }
        let mut probes = crowd[..3 * dim].to_vec();
        probes.extend_from_slice(&twin);
        probes.extend(random_rows(&mut r, 2, dim));
        // k = 100 with 40 rows for one subject needs 3961 rows per probe kept: more than
        // workgroup memory holds, so that slab is scored on the CPU; k = 1 and 7 stay on
        // the GPU. Either way the answers are exact.
        check_engine(engine, &g.snapshot(), &model, &probes, dtype);
        let res = engine
            .search(&g.snapshot(), &twin, &SearchParams { k: 7, threshold: None })
            .unwrap();
        let got: Vec<&str> = res[0].candidates.iter().map(|c| c.subject.as_str()).collect();
        assert_eq!(
            got,
            [
                "twin-00", "twin-01", "twin-02", "twin-03", "twin-04", "twin-05", "twin-06"
            ],
            "{dtype}"
        );
    }
}

#[test]
fn large_k_over_a_tiny_gallery_fills_every_slot_with_nothing() {
    let Some(engine) = gpu_engine() else { return };
    large_k_over_three_rows(&engine);
}

// k = 100 over 3 rows: 97 slots per probe must come back empty, written by the kernels
// (result buffers are poisoned first; an unwritten slot fails the search).
fn large_k_over_three_rows(engine: &Engine) {
    for dtype in Dtype::ALL {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), 5, dtype).unwrap();
        let rows = random_rows(&mut rng(31), 3, 5);
        let batch: Vec<Enrollment> = (0..3)
            .map(|i| Enrollment {
                subject: format!("s{i}"),
                templates: rows[i * 5..(i + 1) * 5].to_vec(),
            })
            .collect();
        g.enroll(&batch).unwrap();
        let res = engine
            .search(
                &g.snapshot(),
                &rows,
                &SearchParams {
                    k: 100,
                    threshold: None,
                },
            )
            .unwrap();
        for (q, r) in res.iter().enumerate() {
            assert_eq!(r.candidates.len(), 3, "probe {q}");
            assert_eq!(r.candidates[0].subject, format!("s{q}"), "probe {q}");
        }
    }
}

#[test]
fn auto_keeps_a_flight_sized_gallery_on_the_cpu_and_answers_the_same() {
    use biogate::engine::route::AutoBackend;
    // Calibrated with shards as large as the device allows, as in production.
    let Some(gpu) = open_gpu_with(GpuOptions::default()) else {
        return;
    };
    let auto = Arc::new(AutoBackend::calibrate(gpu).unwrap());
    for dtype in Dtype::ALL {
        // One flight's manifest: a few hundred travellers, one gate at a time.
        assert!(
            !auto.prefers_gpu(dtype, 300, 512, 1),
            "{dtype}: {:?}",
            auto.costs(dtype)
        );
        let dir = tempfile::tempdir().unwrap();
        let (g, model) = build(dir.path(), 33, dtype, 500, 41);
        let probes = random_rows(&mut rng(42), 4, 33);
        check_engine(&Engine::new(auto.clone()), &g.snapshot(), &model, &probes, dtype);
    }
}

#[test]
fn a_lost_device_is_opened_again_and_the_search_answered_on_it() {
    let Some(gpu) = open_gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (g, model) = build(dir.path(), 8, Dtype::F32, 50, 51);
    let engine = Engine::new(gpu.clone());
    let probes = random_rows(&mut rng(52), 2, 8);
    check_engine(&engine, &g.snapshot(), &model, &probes, Dtype::F32);
    gpu.inject_fault(GpuErrorKind::DeviceLost);
    check_engine(&engine, &g.snapshot(), &model, &probes, Dtype::F32);
    assert_eq!(gpu.reopened(), 1, "the lost device was opened again, once");
    assert!(gpu.resident_bytes() > 0, "the search ran on the new device");
}

#[test]
fn the_logs_resident_copy_grows_in_place_on_the_gpu() {
    // Default shard size: the log's shard starts at 1024 rows and is grown on the GPU
    // (buffer to buffer) as enrollments arrive, searches in between.
    let Some(gpu) = open_gpu_with(GpuOptions::default()) else {
        return;
    };
    let engine = Engine::new(gpu);
    for dtype in Dtype::ALL {
        let dim = 8;
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), dim, dtype).unwrap();
        let mut model = Model::default();
        let mut r = rng(61);
        let probes = random_rows(&mut rng(62), 3, dim);
        for (round, n) in [1000, 30, 1100, 5].into_iter().enumerate() {
            let rows = random_rows(&mut r, n, dim);
            let batch: Vec<Enrollment> = (0..n)
                .map(|i| Enrollment {
                    subject: format!("r{round}-{i:05}"),
                    templates: rows[i * dim..(i + 1) * dim].to_vec(),
                })
                .collect();
            g.enroll(&batch).unwrap();
            for e in &batch {
                model.add(&e.subject, &e.templates, dim);
            }
            check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
        }
    }
}

#[test]
fn auto_acts_on_the_kind_of_gpu_failure() {
    use biogate::engine::route::{AutoBackend, Cost};
    // Costs that send everything to the GPU.
    let cpu = Cost {
        fixed: 1.0,
        per_row: 1.0,
        per_row_probe: 1.0,
    };
    for (kind, gpu_again) in [(GpuErrorKind::OutOfMemory, true), (GpuErrorKind::Internal, false)] {
        let Some(gpu) = open_gpu() else { return };
        let auto = Arc::new(
            AutoBackend::with_costs(gpu.clone(), [(cpu, Cost::default()); 3]).with_retry_after(Duration::ZERO),
        );
        assert!(auto.prefers_gpu(Dtype::I8, 10, 512, 1));
        // One segment: one slab, so the injected fault is the only thing that happens.
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gallery::create(dir.path(), 20, Dtype::I8).unwrap();
        let rows = random_rows(&mut rng(71), 200, 20);
        let ids: Vec<String> = (0..200).map(|i| format!("s{:03}", i / 2)).collect();
        g.import(
            &mut MemoryImport::new(20, &rows, &ids).unwrap(),
            ImportOptions::default(),
            &|_| {},
        )
        .unwrap();
        let mut model = Model::default();
        for (i, id) in ids.iter().enumerate() {
            model.add(id, &rows[i * 20..(i + 1) * 20], 20);
        }
        let probes = random_rows(&mut rng(72), 3, 20);
        let engine = Engine::new(auto);
        // The failure is answered on the CPU, exactly as the CPU engine answers.
        gpu.inject_fault(kind);
        let params = SearchParams { k: 7, threshold: None };
        let got = engine.search(&g.snapshot(), &probes, &params).unwrap();
        assert_eq!(
            got,
            Engine::cpu().search(&g.snapshot(), &probes, &params).unwrap(),
            "{kind}"
        );
        assert_eq!(gpu.resident_bytes(), 0, "{kind}: nothing reached the GPU yet");
        // Out of memory: the slab is tried on the GPU again; a defect: never again.
        check_engine(&engine, &g.snapshot(), &model, &probes, Dtype::I8);
        assert_eq!(gpu.resident_bytes() > 0, gpu_again, "{kind}");
    }
}

#[test]
fn the_upload_verifies_the_rows_it_copies() {
    let Some(gpu) = open_gpu() else { return };
    let engine = Engine::new(gpu);
    let dir = tempfile::tempdir().unwrap();
    let dim = 17;
    let mut g = Gallery::create(dir.path(), dim, Dtype::I8).unwrap();
    let rows = random_rows(&mut rng(12), 300, dim);
    let ids: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
    g.import(
        &mut MemoryImport::new(dim, &rows, &ids).unwrap(),
        ImportOptions::default(),
        &|_| {},
    )
    .unwrap();
    let snapshot = g.snapshot();
    // Skip the engine's own verification, so only the upload's check stands between
    // the damaged bytes and the GPU.
    snapshot.trust_rows();
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bgs"))
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[0x7f], 4096 + 64 * 200 + 3).unwrap();
    let e = engine
        .search(&snapshot, &rows[..dim], &SearchParams { k: 3, threshold: None })
        .unwrap_err();
    assert!(
        matches!(e, biogate::Error::Corrupt(_)) && e.to_string().contains("row data checksum mismatch"),
        "{e}"
    );
    assert!(snapshot.damage().is_some(), "the segment keeps its damage");
}

/// Searches from several threads at once share the device (its lock is not held while
/// a batch runs) and each gets its own answers; a batch larger than one submission
/// (4096 probes) keeps two in flight and comes back whole and in order.
#[test]
fn concurrent_searches_and_batches_of_several_submissions_answer_exactly() {
    let Some(engine) = gpu_engine() else { return };
    let dim = 12;
    let dir = tempfile::tempdir().unwrap();
    let (g, model) = build(dir.path(), dim, Dtype::I8, 400, 5);
    let snapshot = g.snapshot();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (engine, snapshot, model) = (&engine, &snapshot, &model);
            scope.spawn(move || {
                for round in 0..5 {
                    let probes = random_rows(&mut rng(t * 100 + round), 1 + (t as usize * 7) % 19, dim);
                    check_engine(engine, snapshot, model, &probes, Dtype::I8);
                }
            });
        }
    });
    let probes = random_rows(&mut rng(6), 4096 + 300, dim);
    let params = SearchParams { k: 3, threshold: None };
    let gpu = engine.search(&snapshot, &probes, &params).unwrap();
    let cpu = Engine::cpu().search(&snapshot, &probes, &params).unwrap();
    assert_eq!(gpu.len(), cpu.len());
    for (q, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        let a: Vec<(&str, u32)> = a
            .candidates
            .iter()
            .map(|c| (c.subject.as_str(), c.score.to_bits()))
            .collect();
        let b: Vec<(&str, u32)> = b
            .candidates
            .iter()
            .map(|c| (c.subject.as_str(), c.score.to_bits()))
            .collect();
        assert_eq!(a, b, "probe {q}");
    }
}

/// Asking for the tensor-core scan (BIOGATE_GPU_COOPERATIVE=1) on an adapter without
/// cooperative matrices (lavapipe) changes nothing: the plain f16 scan answers.
#[test]
fn cooperative_matrices_asked_for_where_there_are_none_change_nothing() {
    let Some(gpu) = open_gpu_with(GpuOptions {
        cooperative: true,
        ..GpuOptions::default()
    }) else {
        return;
    };
    let engine = Engine::new(gpu);
    let dim = 40;
    let dir = tempfile::tempdir().unwrap();
    let (g, model) = build(dir.path(), dim, Dtype::F16, 600, 8);
    let probes = random_rows(&mut rng(9), 20, dim);
    check_engine(&engine, &g.snapshot(), &model, &probes, Dtype::F16);
}

/// A gallery in one shard with long scan blocks and batches that leave a tile padded
/// with zero probes (every row ties at 0 for them) and that fill it: the same subjects
/// as the CPU engine. (On lavapipe, blocks of 12,500 rows lost candidates here until
/// software adapters got short blocks; see SOFTWARE_MAX_ROWS_PER_BLOCK.)
#[test]
fn a_long_shard_with_padded_and_full_tiles_answers_like_the_cpu() {
    let Some(gpu) = open_gpu_with(GpuOptions::default()) else {
        return;
    };
    let engine = Engine::new(gpu);
    let dim = 24;
    let rows = 100_000;
    let gallery = biogate::template::random_unit_rows(rows, dim, 41);
    for dtype in Dtype::ALL {
        let snapshot = biogate::Snapshot::from_rows(&gallery, dim, dtype);
        for batch in [1, 3, 5, 16, 32] {
            let probes = random_rows(&mut rng(batch as u64 + 40), batch, dim);
            let params = SearchParams { k: 10, threshold: None };
            let got = engine.search(&snapshot, &probes, &params).unwrap();
            let want = Engine::cpu().search(&snapshot, &probes, &params).unwrap();
            for (q, (a, b)) in got.iter().zip(&want).enumerate() {
                let a: Vec<&str> = a.candidates.iter().map(|c| c.subject.as_str()).collect();
                let b: Vec<&str> = b.candidates.iter().map(|c| c.subject.as_str()).collect();
                assert_eq!(a, b, "{dtype}, batch {batch}, probe {q}");
            }
        }
    }
}

/// Options that force the two-stage path (a GEMM into chunks of scores, then the
/// selection) for every batch, with selection segments of 256 rows, chunks of two
/// segments for a 128-probe batch (one for larger ones), merge trees of fan-in 3 and
/// shards of 48 KiB: the larger galleries here span several shards, chunks and
/// segments (dim 17: 2,057 rows), the others one of each (dim 130: 300 rows) or a
/// single row (dim 5).
fn two_stage_options(runtime_checks: bool) -> GpuOptions {
    GpuOptions {
        max_shard_bytes: Some(48 * 1024),
        pipeline: Pipeline::TwoStage,
        select_rows: Some(256),
        chunk_bytes: Some(2 * 256 * 128 * 4),
        merge_fan: Some(3),
        runtime_checks,
        ..GpuOptions::default()
    }
}

/// The two-stage path against the float64 reference (thresholds included) and the CPU
/// engine (i8 bit for bit): odd dimensions, rows that fill no GEMM tile, batches of 1,
/// 9 and 130 probes (a padded GEMM tile, and a second one), k from 1 to 100, several
/// templates per subject, deletions in segments and the log, and a deletion between
/// two searches.
#[test]
fn the_two_stage_path_matches_the_reference_and_the_cpu() {
    let Some(gpu) = open_gpu_with(two_stage_options(false)) else {
        return;
    };
    let engine = Engine::new(gpu.clone());
    for dtype in Dtype::ALL {
        for (dim, rows, batches) in [(17, 2057, &[1, 130][..]), (130, 300, &[9][..]), (5, 1, &[3][..])] {
            let dir = tempfile::tempdir().unwrap();
            let (mut g, mut model) = build(dir.path(), dim, dtype, rows, dim as u64 * 7 + rows as u64);
            for &batch in batches {
                let probes = random_rows(&mut rng(batch as u64 + 900), batch, dim);
                check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
                same_as_cpu(&engine, &g, &probes, dtype);
            }
            // The best subject of a probe equal to one of its templates, deleted: the
            // next search must not find it (the resident tombstones are read at
            // selection).
            let victim = model.subjects()[model.subjects().len() / 2].clone();
            let template = model.rows.iter().find(|(s, _)| *s == victim).unwrap().1.clone();
            let params = SearchParams { k: 3, threshold: None };
            let before = engine.search(&g.snapshot(), &template, &params).unwrap();
            assert_eq!(before[0].candidates[0].subject, victim, "{dtype}, dim {dim}");
            let path = gpu.last_kernel_times().map_or("", |t| t.path);
            assert!(
                path.starts_with("two-stage"),
                "{dtype}, dim {dim}: the two-stage kernels searched, not {path:?}"
            );
            g.delete_subject(&victim).unwrap();
            model.delete(&victim);
            let after = engine.search(&g.snapshot(), &template, &params).unwrap();
            assert!(
                after[0].candidates.iter().all(|c| c.subject != victim),
                "{dtype}, dim {dim}: a deleted subject was found"
            );
            check_engine(&engine, &g.snapshot(), &model, &template, dtype);
        }
    }
    ties_and_many_templates_per_subject(&engine);
    large_k_over_three_rows(&engine);
}

/// With wgpu's runtime checks (bounds checks, loop bounding) and zero-filled workgroup
/// memory, as `BIOGATE_GPU_CHECKS=1` asks, both paths answer as without them (every
/// other test runs the trusted kernels).
#[test]
fn the_kernels_answer_the_same_with_wgpu_runtime_checks() {
    let fused = GpuOptions {
        max_shard_bytes: Some(SHARD_BYTES),
        pipeline: Pipeline::Fused,
        runtime_checks: true,
        ..GpuOptions::default()
    };
    for (options, path) in [(fused, "fused"), (two_stage_options(true), "two-stage")] {
        let Some(gpu) = open_gpu_with(options) else {
            return;
        };
        let engine = Engine::new(gpu.clone());
        for dtype in Dtype::ALL {
            let dim = 19;
            let dir = tempfile::tempdir().unwrap();
            let (g, model) = build(dir.path(), dim, dtype, 700, 23);
            for batch in [1, 17] {
                let probes = random_rows(&mut rng(batch as u64 + 70), batch, dim);
                check_engine(&engine, &g.snapshot(), &model, &probes, dtype);
                same_as_cpu(&engine, &g, &probes, dtype);
                engine
                    .search(&g.snapshot(), &probes, &SearchParams { k: 3, threshold: None })
                    .unwrap();
                let got = gpu.last_kernel_times().map_or("cpu", |t| t.path);
                // With the tensor cores on, an f16 batch of 16 or more takes their fused scan.
                let fused_on_tensor_cores = path == "fused" && got == "tensor cores";
                assert!(
                    got.starts_with(path) || fused_on_tensor_cores,
                    "{dtype}, batch {batch}: {got} searched, not {path}"
                );
            }
        }
    }
}
