//! The command line end to end, as a user runs it: synth -> create -> import -> info ->
//! identify (JSON and CSV) -> delete -> compact -> check, plus the demo and errors.
#![cfg(feature = "cli")]

use std::path::Path;
use std::process::{Command, Output};

fn biogate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biogate")).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = biogate(args);
    assert!(
        out.status.success(),
        "biogate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let out = biogate(args);
    assert!(!out.status.success(), "biogate {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(needle),
        "biogate {args:?}: {err:?} should mention {needle:?}"
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn the_whole_command_line_journey() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, out) = synth_gallery(work.path(), 300, 2, 256, 50, "i8");
    for f in [
        "gallery.npy",
        "gallery_ids.txt",
        "mated.npy",
        "mated_ids.txt",
        "nonmated.npy",
    ] {
        assert!(data.join(f).exists(), "{f}");
    }
    assert!(out.contains("imported 600 templates of 300 subjects"), "{out}");
    fails(
        &[
            "gallery",
            "import",
            p(&g),
            "--templates",
            p(&data.join("gallery.npy")),
            "--ids",
            p(&data.join("gallery_ids.txt")),
        ],
        "already enrolled",
    );
    let info: serde_json::Value = serde_json::from_str(&ok(&["gallery", "info", p(&g), "--json"])).unwrap();
    assert_eq!(
        (info["rows"].as_u64(), info["subjects"].as_u64(), info["dtype"].as_str()),
        (Some(600), Some(300), Some("i8"))
    );

    // Identify mated probes: rank 1 is the right subject, above a 0.4 threshold.
    let mated_ids: Vec<String> = std::fs::read_to_string(data.join("mated_ids.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let out = ok(&[
        "identify",
        p(&g),
        "--probes",
        p(&data.join("mated.npy")),
        "-k",
        "3",
        "--threshold",
        "0.4",
    ]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 50);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["probe"].as_u64(), Some(i as u64));
        assert_eq!(l["matched"].as_bool(), Some(true));
        assert_eq!(
            l["candidates"][0]["subject"].as_str(),
            Some(mated_ids[i].as_str()),
            "probe {i}"
        );
    }
    // Non-mated probes: nobody above the threshold.
    let out = ok(&[
        "identify",
        p(&g),
        "--probes",
        p(&data.join("nonmated.npy")),
        "-k",
        "3",
        "--threshold",
        "0.4",
    ]);
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["matched"].as_bool(), Some(false));
        assert_eq!(v["candidates"].as_array().unwrap().len(), 0);
    }
    // CSV, and no threshold: no decision.
    let out = ok(&[
        "identify",
        p(&g),
        "--probes",
        p(&data.join("mated.npy")),
        "-k",
        "2",
        "--format",
        "csv",
    ]);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows[0], "probe,rank,subject,score,matched");
    assert_eq!(rows.len(), 1 + 50 * 2);
    assert!(
        rows[1].starts_with(&format!("0,1,\"{}\",", mated_ids[0])),
        "{}",
        rows[1]
    );

    // Delete the first probe's subject: it is no longer found, before and after compaction.
    ok(&["gallery", "delete", p(&g), "--subject", &mated_ids[0]]);
    fails(&["gallery", "delete", p(&g), "--subject", &mated_ids[0]], "not found");
    let first = |out: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        v["candidates"][0]["subject"].as_str().unwrap_or("").to_owned()
    };
    let out = ok(&["identify", p(&g), "--probes", p(&data.join("mated.npy")), "-k", "1"]);
    assert_ne!(first(&out), mated_ids[0]);
    let out = ok(&["gallery", "compact", p(&g)]);
    assert!(out.contains("kept 598 rows, dropped 2"), "{out}");
    let out = ok(&["identify", p(&g), "--probes", p(&data.join("mated.npy")), "-k", "1"]);
    assert_ne!(first(&out), mated_ids[0]);
    let out = ok(&["gallery", "check", p(&g)]);
    assert!(out.contains("ok: 598 templates of 299 subjects"), "{out}");
    let out = ok(&["gallery", "info", p(&g)]);
    assert!(out.contains("segments   1"), "{out}");

    // Errors a user can make.
    fails(
        &["identify", p(&g), "--probes", p(&data.join("mated.npy")), "-k", "0"],
        "k = 0",
    );
    fails(
        &[
            "identify",
            p(&work.path().join("nope")),
            "--probes",
            p(&data.join("mated.npy")),
        ],
        "not a biogate gallery",
    );
    ok(&[
        "synth",
        "--subjects",
        "3",
        "--dim",
        "65",
        "--probes",
        "2",
        "--out",
        p(&work.path().join("d65")),
    ]);
    fails(
        &["identify", p(&g), "--probes", p(&work.path().join("d65/mated.npy"))],
        "dimension 65",
    );
    fails(&["gallery", "create", p(&g), "--dim", "256"], "already exists");
    fails(
        &["gallery", "create", p(&work.path().join("g2")), "--dim", "5000"],
        "out of range",
    );
}

#[test]
fn the_demo_runs_with_no_setup() {
    // Realistic synthetic data: a few poor captures and lookalikes, so the accuracy
    // lines say something (rank-1 below 100% is possible, FNIR above 0).
    let out = ok(&["demo", "--subjects", "500"]);
    assert!(
        out.contains("realistic synthetic data") && out.contains("rank-1 "),
        "{out}"
    );
    assert!(out.contains("probes/s"), "{out}");
    assert!(
        out.contains("over gRPC") && out.contains("matched to their subject"),
        "{out}"
    );
    // The day at the border: two flights derived, one watchlist hit, exactly one
    // overstayer (the demo itself fails unless the reports show what it planted).
    assert!(
        out.contains("flight-AF0123: derived") && out.contains("flight-LH0456: derived"),
        "{out}"
    );
    assert!(out.contains("watchlist hits: subject-"), "{out}");
    let overstays = out.split("encounters overstays").nth(1).expect("an overstay report");
    let rows: Vec<&str> = overstays.lines().skip(2).take_while(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 1, "one overstayer: {out}");
}

#[test]
fn bench_prints_a_table() {
    let out = ok(&[
        "bench",
        "--rows",
        "3000",
        "--dim",
        "32",
        "--batches",
        "1,4",
        "--min-seconds",
        "0.01",
    ]);
    for dtype in ["f32", "f16", "i8"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!(" {dtype} ")) && l.contains("3000")),
            "{out}"
        );
    }
}

#[test]
fn eval_writes_a_report_and_dedup_writes_pairs() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, _) = synth_gallery(work.path(), 400, 2, 128, 300, "f32");
    let report = work.path().join("report");
    let out = ok(&[
        "eval",
        p(&g),
        "--mated",
        p(&data.join("mated.npy")),
        "--mated-ids",
        p(&data.join("mated_ids.txt")),
        "--nonmated",
        p(&data.join("nonmated.npy")),
        "-k",
        "5",
        "--compare-dtypes",
        "--out",
        p(&report),
    ]);
    assert!(
        out.contains("| f32 | 1.0000 | 1.0000 |") && out.contains("| i8 |"),
        "{out}"
    );
    for f in [
        "report.md",
        "report.json",
        "det.svg",
        "det.png",
        "scores.svg",
        "scores.png",
    ] {
        let bytes = std::fs::read(report.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        assert!(bytes.len() > 1000, "{f} is too small");
    }
    assert!(std::fs::read(report.join("det.png")).unwrap().starts_with(b"\x89PNG"));
    assert!(
        std::fs::read_to_string(report.join("det.svg"))
            .unwrap()
            .contains("<svg")
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    assert_eq!(json[0]["operating_points"][1]["target_fpir"].as_f64(), Some(0.003));

    // No duplicates in this gallery at 0.5 (each subject's two samples share one id)...
    let pairs = work.path().join("pairs.csv");
    let out = ok(&["dedup", p(&g), "--threshold", "0.5", "--out", p(&pairs)]);
    assert!(
        out.contains("searched 800 templates") && out.contains(": 0 pairs"),
        "{out}"
    );
    // ...until someone is enrolled twice under another id.
    ok(&[
        "gallery",
        "import",
        p(&g),
        "--templates",
        p(&data.join("mated.npy")),
        "--ids",
        p(&data.join("mated_ids.txt")),
        "--add-to-existing",
    ]);
    let out = ok(&["dedup", p(&g), "--threshold", "0.5", "--out", p(&pairs)]);
    assert!(
        out.contains(": 0 pairs"),
        "same ids are the same subject, not duplicates: {out}"
    );
    fails(&["dedup", p(&g), "--out", p(&pairs)], "needs --threshold, --top");
}

/// Synthetic data in `work/data` imported into a new gallery `work/g` (and what the
/// import printed).
fn synth_gallery(
    work: &Path,
    subjects: usize,
    samples: usize,
    dim: usize,
    probes: usize,
    dtype: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (data, g) = (work.join("data"), work.join("g"));
    let n = |v: usize| v.to_string();
    ok(&[
        "synth",
        "--subjects",
        &n(subjects),
        "--samples",
        &n(samples),
        "--dim",
        &n(dim),
        "--probes",
        &n(probes),
        "--difficulty",
        "easy",
        "--out",
        p(&data),
    ]);
    ok(&["gallery", "create", p(&g), "--dim", &n(dim), "--dtype", dtype]);
    let out = ok(&[
        "gallery",
        "import",
        p(&g),
        "--templates",
        p(&data.join("gallery.npy")),
        "--ids",
        p(&data.join("gallery_ids.txt")),
    ]);
    (data, g, out)
}

/// `biogate ARGS` with extra environment variables.
fn biogate_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn identify_on_the_gpu_prints_what_the_cpu_prints() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, _) = synth_gallery(work.path(), 400, 3, 96, 40, "i8");
    let identify = |backend: &str| {
        biogate_env(
            &[
                "identify",
                p(&g),
                "--probes",
                p(&data.join("mated.npy")),
                "-k",
                "7",
                "--backend",
                backend,
            ],
            // Shards of 64 rows (one interleaved tile): the 1200-row gallery spans 19.
            &[("BIOGATE_GPU_SHARD_BYTES", "8192")],
        )
    };
    let gpu = identify("gpu");
    if !gpu.status.success() {
        let err = String::from_utf8_lossy(&gpu.stderr);
        assert!(
            err.contains("no GPU adapter") && std::env::var("BIOGATE_REQUIRE_GPU").as_deref() != Ok("1"),
            "identify --backend gpu failed: {err}"
        );
        eprintln!("NOTICE: no GPU adapter; GPU command-line test skipped");
        return;
    }
    let cpu = identify("cpu");
    assert!(cpu.status.success());
    let cpu_out = String::from_utf8(cpu.stdout).unwrap();
    assert_eq!(
        String::from_utf8(gpu.stdout).unwrap(),
        cpu_out,
        "i8 candidate lists and scores are bit-identical"
    );
    // Scan blocks as short as they go (one row tile) and longer than the gallery: the
    // block length moves work between the scan and the merge, never the answers.
    let mated = data.join("mated.npy");
    for rows in ["1", "100000"] {
        let args = ["identify", p(&g), "--probes", p(&mated), "-k", "7", "--backend", "gpu"];
        let out = biogate_env(&args, &[("BIOGATE_GPU_BLOCK_ROWS", rows)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), cpu_out, "blocks of {rows} rows");
    }
    let bad = biogate_env(
        &["identify", p(&g), "--probes", p(&mated), "--backend", "cpu"],
        &[("BIOGATE_GPU_BLOCK_ROWS", "0")],
    );
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("BIOGATE_GPU_BLOCK_ROWS=\"0\" is not a positive number of rows"),
        "{err}"
    );
    // The bench names the card and reports the kernels' time when it can.
    let out = ok(&[
        "bench",
        "--backend",
        "gpu",
        "--rows",
        "3000",
        "--dim",
        "32",
        "--batches",
        "1,4",
        "--dtypes",
        "i8",
        "--min-seconds",
        "0.01",
    ]);
    assert!(out.starts_with("device: GPU "), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("gpu ") && l.contains(" i8 ")),
        "{out}"
    );
    // Asking for an adapter that is not there is an error naming it.
    let out = biogate_env(
        &[
            "identify",
            p(&g),
            "--probes",
            p(&data.join("mated.npy")),
            "--backend",
            "gpu",
        ],
        &[("WGPU_ADAPTER_NAME", "no-such-card")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-card"));
}

#[test]
fn damage_is_refused_by_identify_and_repaired_by_the_repair_verb() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, _) = synth_gallery(work.path(), 100, 1, 32, 10, "f32");
    let probes = data.join("mated.npy");
    let clean = ok(&["identify", p(&g), "--probes", p(&probes), "--backend", "cpu"]);
    // A flipped byte in the rows: identify refuses (naming the file and the rows)...
    let seg = std::fs::read_dir(&g)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|e| e == "bgs"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[4096 + 128 * 50 + 1] ^= 0x08;
    std::fs::write(&seg, &bytes).unwrap();
    fails(
        &["identify", p(&g), "--probes", p(&probes), "--backend", "cpu"],
        "row data checksum mismatch",
    );
    // The rows are checked as they are first scored: no candidate list is printed, and
    // the error names the chunk and rows `gallery check` names.
    let refused = biogate(&["identify", p(&g), "--probes", p(&probes), "--backend", "cpu"]);
    assert!(
        refused.stdout.is_empty(),
        "a candidate list was printed from damaged rows"
    );
    let check = biogate(&["gallery", "check", p(&g)]);
    let check_says = String::from_utf8_lossy(&check.stderr);
    let chunk = check_says
        .split("checksum mismatch")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("check names the chunk");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(chunk),
        "identify and check name the same chunk and rows ({chunk:?})"
    );
    // ...unless told not to verify (then the damaged row is scored: the user's choice).
    ok(&[
        "identify",
        p(&g),
        "--probes",
        p(&probes),
        "--backend",
        "cpu",
        "--no-verify",
    ]);
    fails(&["gallery", "check", p(&g)], "checksum mismatch");
    // The repair keeps what it can, keeps the damaged file aside and names the subjects.
    let out = ok(&["gallery", "repair", p(&g)]);
    assert!(out.contains("lost:  subject \"subject-00000050\""), "{out}");
    assert!(out.contains("kept:") && out.contains("damaged"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&ok(&["gallery", "repair", p(&g), "--json"])).unwrap();
    assert_eq!(report["clean"], true, "a second repair finds nothing to do");
    assert!(
        ok(&["gallery", "check", p(&g)]).starts_with("ok: 0 templates"),
        "one chunk held every row"
    );
    assert_ne!(clean, "", "the clean gallery answered");
}

/// A verb run with stderr going to a file or a pipe prints nothing there on success: no
/// INFO lines, no colour escapes, no driver noise (XDG_RUNTIME_DIR unset, as on a
/// headless server). `-v` brings the INFO lines back, still without escapes; a
/// negative threshold parses as `--threshold -0.5`.
#[test]
fn a_verb_on_a_pipe_is_quiet_unless_asked() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, _) = synth_gallery(work.path(), 50, 1, 32, 5, "f32");
    let probes = data.join("mated.npy");
    let run = |extra: &[&str]| {
        let mut args = vec!["identify", p(&g), "--probes", p(&probes), "--backend", "auto"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_biogate"))
            .args(&args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("RUST_LOG")
            .env_remove("NO_COLOR")
            .env("TERM", "xterm-256color")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 5);
        String::from_utf8(out.stderr).unwrap()
    };
    assert_eq!(run(&[]), "", "a successful verb says nothing on stderr");
    assert_eq!(run(&["--threshold", "-0.5"]), "");
    let verbose = run(&["-v"]);
    assert!(verbose.contains("INFO") && verbose.contains("identify"), "{verbose}");
    assert!(
        !verbose.contains('\u{1b}'),
        "no escapes when stderr is not a terminal: {verbose:?}"
    );
    assert!(!verbose.contains("XDG_RUNTIME_DIR"), "{verbose}");
}

#[test]
fn completions_and_the_manual_page_come_from_the_flag_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(&["completions", shell]);
        assert!(out.contains("identify") && out.contains("threshold"), "{shell}");
    }
    let man = ok(&["man"]);
    assert!(man.contains(".TH biogate") && man.contains("identify"), "{man}");
}

/// `gallery derive`: a flight's gallery from a master and a manifest file; unknown
/// subjects named, a repeated one refused by its line.
#[test]
fn a_flight_gallery_is_derived_on_the_command_line() {
    let work = tempfile::tempdir().unwrap();
    let (_, g, _) = synth_gallery(work.path(), 100, 2, 32, 5, "f16");
    let manifest = work.path().join("manifest.txt");
    std::fs::write(&manifest, "subject-00000003\nsubject-00000042\nnobody\n").unwrap();
    let flight = work.path().join("flight");
    let out = ok(&[
        "gallery",
        "derive",
        p(&g),
        p(&flight),
        "--subjects",
        p(&manifest),
        "--json",
        "--expires-at",
        "2099-01-01T06:00:00+02:00",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (report["subjects"].as_u64(), report["rows"].as_u64()),
        (Some(2), Some(4)),
        "{out}"
    );
    assert_eq!(report["missing"], serde_json::json!(["nobody"]));
    let info: serde_json::Value = serde_json::from_str(&ok(&["gallery", "info", p(&flight), "--json"])).unwrap();
    assert_eq!(
        (info["subjects"].as_u64(), info["dtype"].as_str()),
        (Some(2), Some("f16"))
    );
    assert_eq!(info["expires_at"], "2099-01-01T04:00:00Z", "the flight's end, in UTC");
    let derive_until = |at: &str| {
        let dst = work.path().join("f3");
        let args = [
            "gallery",
            "derive",
            p(&g),
            p(&dst),
            "--subjects",
            p(&manifest),
            "--expires-at",
            at,
        ];
        args.map(str::to_owned)
    };
    fails(
        &derive_until("2020-01-01T00:00:00Z").each_ref().map(String::as_str),
        "not in the future",
    );
    fails(&derive_until("tomorrow").each_ref().map(String::as_str), "--expires-at");
    assert!(!work.path().join("f3").exists());
    std::fs::write(&manifest, "a\nb\na\n").unwrap();
    fails(
        &[
            "gallery",
            "derive",
            p(&g),
            p(&work.path().join("f2")),
            "--subjects",
            p(&manifest),
        ],
        "repeats",
    );
    assert!(!work.path().join("f2").exists());
}

/// Run `args` with stdout into a pipe whose reader takes one line and goes away (as
/// `| head -1` does): the verb ends quietly and successfully, with nothing on stderr.
fn quiet_when_the_reader_goes_away(args: &[&str]) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("{\"probe\":0"), "{args:?}: {first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
    assert!(stderr.is_empty(), "{args:?}: {stderr}");
}

#[test]
fn verbs_that_print_end_quietly_when_their_reader_goes_away() {
    let work = tempfile::tempdir().unwrap();
    let (data, g, _) = synth_gallery(work.path(), 300, 1, 32, 4000, "f32");
    let probes = data.join("mated.npy");
    quiet_when_the_reader_goes_away(&["identify", p(&g), "--probes", p(&probes), "-k", "10"]);
    // The same through a server serving that gallery.
    let serve_data = work.path().join("serve");
    std::fs::create_dir_all(serve_data.join("galleries")).unwrap();
    std::fs::rename(&g, serve_data.join("galleries").join("g")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args([
            "serve",
            "--listen",
            &addr,
            "--metrics-listen",
            "off",
            "--backend",
            "cpu",
            "--data-dir",
        ])
        .arg(&serve_data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://{addr}");
    let up = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        biogate(&["client", "--addr", &url, "galleries"]).status.success()
    });
    assert!(up, "the server did not come up");
    quiet_when_the_reader_goes_away(&[
        "client",
        "--addr",
        &url,
        "identify",
        "--gallery",
        "g",
        "--probes",
        p(&probes),
        "-k",
        "10",
    ]);
    server.kill().unwrap();
    server.wait().unwrap();
}
