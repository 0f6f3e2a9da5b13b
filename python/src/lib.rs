//! biogate for Python: a gallery on disk, searched with numpy arrays in and out.
//!
//! Probes and templates are 2-D float32 C-contiguous arrays, read in place (no copy);
//! other dtypes and layouts are converted once, and anything that is not a matrix is
//! refused with a ValueError naming its dtype and shape. Every search, enrollment and
//! compaction runs with the GIL released, so Python threads search in parallel.

use ::biogate::engine::{BackendChoice, Engine, SearchParams, open_engine};
use ::biogate::error::Error as BgError;
use ::biogate::gallery::{Enrollment, Gallery as BgGallery};
use ::biogate::template::Dtype;
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

create_exception!(
    biogate,
    Error,
    PyException,
    "Base class of biogate's errors (other than bad input: ValueError)."
);
create_exception!(
    biogate,
    NotFoundError,
    Error,
    "A gallery or subject that does not exist."
);
create_exception!(biogate, CorruptError, Error, "Damage found in a gallery's files.");
create_exception!(
    biogate,
    StorageError,
    Error,
    "The disk failed or the gallery is locked or closed for writing."
);
create_exception!(biogate, GpuError, Error, "The GPU failed or is not there.");

/// A library error as a Python exception carrying the engine's message.
fn py_err(e: BgError) -> PyErr {
    let m = e.to_string();
    match e {
        BgError::InvalidInput(_) | BgError::AlreadyExists(_) => PyValueError::new_err(m),
        BgError::NotFound(_) => NotFoundError::new_err(m),
        BgError::Corrupt(_) => CorruptError::new_err(m),
        BgError::Io { .. } | BgError::Locked(_) | BgError::Poisoned(_) | BgError::OutcomeUnknown(_) => {
            StorageError::new_err(m)
        }
        BgError::Gpu(_) => GpuError::new_err(m),
        BgError::Remote { code, .. } => match code.as_str() {
            "INVALID_ARGUMENT" | "ALREADY_EXISTS" => PyValueError::new_err(m),
            "NOT_FOUND" => NotFoundError::new_err(m),
            "DATA_LOSS" => CorruptError::new_err(m),
            _ => Error::new_err(m),
        },
        _ => Error::new_err(m),
    }
}

/// Rows of a 2-D float32 array, borrowed when it is C-contiguous, else copied once.
fn rows<'a>(a: &'a PyReadonlyArray2<'_, f32>, what: &str) -> PyResult<std::borrow::Cow<'a, [f32]>> {
    // as_slice also accepts Fortran order, whose memory is not rows: C order only.
    match a.as_slice() {
        Ok(s) if a.is_c_contiguous() => Ok(std::borrow::Cow::Borrowed(s)),
        _ => {
            let owned: Vec<f32> = a.as_array().iter().copied().collect();
            if owned.len() != a.len() {
                return Err(PyValueError::new_err(format!("{what}: could not read the array")));
            }
            Ok(std::borrow::Cow::Owned(owned))
        }
    }
}

/// An array argument as float32 rows: a 2-D array of any real dtype is converted
/// (float32 C-contiguous arrays are read in place); anything else is refused.
fn as_matrix<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>, what: &str) -> PyResult<PyReadonlyArray2<'py, f32>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
        return Ok(a);
    }
    let np = py.import("numpy")?;
    let describe = |o: &Bound<'py, PyAny>| -> String {
        let dtype = o
            .getattr("dtype")
            .map(|d| d.to_string())
            .unwrap_or_else(|_| o.get_type().to_string());
        let shape = o.getattr("shape").map(|s| s.to_string()).unwrap_or_else(|_| "?".into());
        format!("dtype {dtype}, shape {shape}")
    };
    let array = np.call_method1("asarray", (obj,))?;
    let ndim: usize = array.getattr("ndim")?.extract()?;
    let kind: String = array.getattr("dtype")?.getattr("kind")?.extract()?;
    if ndim != 2 || !matches!(kind.as_str(), "f" | "i" | "u") {
        return Err(PyValueError::new_err(format!(
            "{what} must be a 2-D array of numbers (rows x dim), got {}",
            describe(&array)
        )));
    }
    let converted = np.call_method1("ascontiguousarray", (array, "float32"))?;
    converted
        .extract::<PyReadonlyArray2<'py, f32>>()
        .map_err(|_| PyValueError::new_err(format!("{what}: cannot read {}", describe(&converted))))
}

/// A serialisable value as Python objects (through JSON).
fn as_python<T: serde::Serialize>(py: Python<'_>, value: &T) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| Error::new_err(e.to_string()))?;
    Ok(py.import("json")?.call_method1("loads", (text,))?.unbind())
}

/// The fields of one CSV line as dedup writes it (quoted ids, `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// A gallery on disk (one directory), opened for reading and writing by this process.
#[pyclass(name = "Gallery", module = "biogate")]
struct PyGallery {
    path: PathBuf,
    gallery: Mutex<BgGallery>,
    engines: Mutex<HashMap<String, Engine>>,
}

impl PyGallery {
    fn engine(&self, backend: &str) -> PyResult<Engine> {
        let choice: BackendChoice = backend.parse().map_err(py_err)?;
        let mut engines = self.engines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = engines.get(backend) {
            return Ok(e.clone());
        }
        let (engine, _) = open_engine(choice).map_err(py_err)?;
        engines.insert(backend.to_owned(), engine.clone());
        Ok(engine)
    }

    fn snapshot(&self) -> Arc<::biogate::gallery::Snapshot> {
        self.gallery.lock().unwrap_or_else(|p| p.into_inner()).snapshot()
    }
}

#[pymethods]
impl PyGallery {
    /// Create an empty gallery at `path` for templates of `dim` values stored as
    /// `dtype` ("f32", "f16" or "i8").
    #[staticmethod]
    #[pyo3(signature = (path, dim, dtype = "f32"))]
    fn create(py: Python<'_>, path: PathBuf, dim: usize, dtype: &str) -> PyResult<PyGallery> {
        let dtype = Dtype::ALL
            .into_iter()
            .find(|d| d.to_string() == dtype)
            .ok_or_else(|| PyValueError::new_err(format!("dtype {dtype:?}: use \"f32\", \"f16\" or \"i8\"")))?;
        let p = path.clone();
        let g = py.detach(move || BgGallery::create(&p, dim, dtype)).map_err(py_err)?;
        Ok(PyGallery {
            path,
            gallery: Mutex::new(g),
            engines: Mutex::new(HashMap::new()),
        })
    }

    /// Open the gallery at `path` (its files are checked; damage raises CorruptError).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<PyGallery> {
        let p = path.clone();
        let g = py.detach(move || BgGallery::open(&p)).map_err(py_err)?;
        Ok(PyGallery {
            path,
            gallery: Mutex::new(g),
            engines: Mutex::new(HashMap::new()),
        })
    }

    /// Enroll one template per row of `templates` (rows x dim) under `subjects[i]`
    /// (a subject may appear on several rows); durable when this returns. Returns the
    /// number of templates enrolled.
    fn enroll(&self, py: Python<'_>, subjects: Vec<String>, templates: &Bound<'_, PyAny>) -> PyResult<usize> {
        let (array, dim) = templates_for(py, templates, subjects.len())?;
        let values = rows(&array, "templates")?;
        let batch: Vec<Enrollment> = subjects
            .into_iter()
            .zip(values.chunks_exact(dim.max(1)))
            .map(|(subject, row)| Enrollment {
                subject,
                templates: row.to_vec(),
            })
            .collect();
        py.detach(|| {
            let mut g = self.gallery.lock().unwrap_or_else(|p| p.into_inner());
            g.enroll(&batch)
        })
        .map_err(py_err)?;
        Ok(batch.len())
    }

    /// Delete a subject and all its templates (NotFoundError if it is not enrolled).
    fn delete(&self, py: Python<'_>, subject: &str) -> PyResult<()> {
        py.detach(|| {
            let mut g = self.gallery.lock().unwrap_or_else(|p| p.into_inner());
            g.delete_subject(subject)
        })
        .map_err(py_err)
    }

    /// Search `probes` (rows x dim). Returns `(subjects, scores, matched)`: per probe the
    /// best `k` distinct subjects (a list of lists, best first, shorter where fewer
    /// qualify), their scores as a float32 array (probes x k, NaN where there is no
    /// candidate), and with a threshold whether each probe matched (bool array; without
    /// one, None).
    #[pyo3(signature = (probes, k = 10, threshold = None, backend = "auto"))]
    #[allow(clippy::type_complexity)]
    fn identify<'py>(
        &self,
        py: Python<'py>,
        probes: &Bound<'py, PyAny>,
        k: usize,
        threshold: Option<f32>,
        backend: &str,
    ) -> PyResult<Answers<'py>> {
        let array = as_matrix(py, probes, "probes")?;
        let values = rows(&array, "probes")?;
        let engine = self.engine(backend)?;
        let snapshot = self.snapshot();
        let params = SearchParams { k, threshold };
        let values: &[f32] = &values;
        let results = py
            .detach(|| engine.search(&snapshot, values, &params))
            .map_err(py_err)?;
        let answers = results
            .into_iter()
            .map(|r| {
                let matched = r.matched.unwrap_or(false);
                (
                    r.candidates.into_iter().map(|c| (c.subject, c.score)).collect(),
                    matched,
                )
            })
            .collect();
        to_numpy(py, k, threshold, answers)
    }

    /// 1:1: the score of `probe` (a 1-D array of dim values) against `subject`'s best
    /// template, or None if the subject is not enrolled.
    fn verify(&self, py: Python<'_>, probe: Vec<f32>, subject: &str) -> PyResult<Option<f32>> {
        let snapshot = self.snapshot();
        py.detach(|| Engine::cpu().verify(&snapshot, &probe, subject))
            .map_err(py_err)
    }

    /// What `biogate gallery info` prints, as a dict.
    fn info(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let info = ::biogate::gallery::info(&self.path).map_err(py_err)?;
        as_python(py, &info)
    }

    /// Seal the log and rewrite the live rows into one segment, dropping deleted rows.
    fn compact(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut g = self.gallery.lock().unwrap_or_else(|p| p.into_inner());
            g.compact().map(|_| ())
        })
        .map_err(py_err)
    }

    /// Accuracy as `biogate eval` reports it: rank-1 and rank-k rates, FNIR at FPIR
    /// 0.001 / 0.003 / 0.01 with their thresholds, and per search the mate's rank and
    /// score and each non-mated search's top score (a dict, as report.json holds it).
    #[pyo3(signature = (mated, mated_ids, nonmated, k = 20, rank = 1, backend = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn eval(
        &self,
        py: Python<'_>,
        mated: &Bound<'_, PyAny>,
        mated_ids: Vec<String>,
        nonmated: &Bound<'_, PyAny>,
        k: usize,
        rank: usize,
        backend: &str,
    ) -> PyResult<Py<PyAny>> {
        let engine = self.engine(backend)?;
        let snapshot = self.snapshot();
        let searches = Searches { mated_ids, k, rank };
        eval_with(py, mated, nonmated, searches, move || Ok((snapshot, engine)))
    }

    /// N:N de-duplication as `biogate dedup` runs it: pairs of different subjects
    /// scoring at or above `threshold` and/or each template's `top` nearest other
    /// subjects, written to the CSV `out`. Returns `(subject_a, subject_b, scores)`:
    /// two lists and a float32 array, best first.
    #[pyo3(signature = (out, threshold = None, top = None, batch = 1024, backend = "auto"))]
    #[allow(clippy::type_complexity)]
    fn dedup<'py>(
        &self,
        py: Python<'py>,
        out: PathBuf,
        threshold: Option<f32>,
        top: Option<usize>,
        batch: usize,
        backend: &str,
    ) -> PyResult<(Vec<String>, Vec<String>, Bound<'py, PyArray1<f32>>)> {
        let engine = self.engine(backend)?;
        let options = ::biogate::dedup::DedupOptions { threshold, top, batch };
        let (dir, path) = (self.path.clone(), out.clone());
        py.detach(|| ::biogate::dedup::dedup(&engine, &dir, options, &path, &mut |_, _| true))
            .map_err(py_err)?;
        read_pairs(py, &out)
    }

    /// The gallery's directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }
}

/// A connection to a biogate server (`biogate serve`), with the same searches as
/// `Gallery` against named galleries there.
#[pyclass(name = "Client", module = "biogate")]
struct PyClient {
    runtime: tokio::runtime::Runtime,
    client: ::biogate::client::Client,
}

impl PyClient {
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        f: impl std::future::Future<Output = Result<T, ::biogate::client::Status>> + Send,
    ) -> PyResult<T> {
        py.detach(|| self.runtime.block_on(f))
            .map_err(|s| py_err(::biogate::client::remote_error(s)))
    }
}

#[pymethods]
impl PyClient {
    /// Connect to `addr` (e.g. "http://127.0.0.1:50051"; https with `ca_cert`), with a
    /// bearer `token` when the server asks for one.
    #[new]
    #[pyo3(signature = (addr, token = None, ca_cert = None, client_cert = None, client_key = None, domain = None))]
    fn new(
        py: Python<'_>,
        addr: String,
        token: Option<String>,
        ca_cert: Option<PathBuf>,
        client_cert: Option<PathBuf>,
        client_key: Option<PathBuf>,
        domain: Option<String>,
    ) -> PyResult<PyClient> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::new_err(format!("starting the client's runtime: {e}")))?;
        let options = ::biogate::client::ConnectOptions {
            addr,
            token,
            ca_cert,
            client_cert,
            client_key,
            domain,
        };
        let client = py
            .detach(|| runtime.block_on(::biogate::client::Client::connect(&options)))
            .map_err(py_err)?;
        Ok(PyClient { runtime, client })
    }

    /// As `Gallery.identify`, against the server's gallery `gallery`.
    #[pyo3(signature = (gallery, probes, k = 10, threshold = None))]
    #[allow(clippy::type_complexity)]
    fn identify<'py>(
        &self,
        py: Python<'py>,
        gallery: &str,
        probes: &Bound<'py, PyAny>,
        k: usize,
        threshold: Option<f32>,
    ) -> PyResult<Answers<'py>> {
        let array = as_matrix(py, probes, "probes")?;
        let dim = array.shape()[1];
        let values = rows(&array, "probes")?;
        let values: &[f32] = &values;
        let k32 = u32::try_from(k).map_err(|_| PyValueError::new_err(format!("k = {k} is too large")))?;
        let results = self.call(py, self.client.identify(gallery, values, dim, k32, threshold))?;
        let answers = results
            .into_iter()
            .map(|r| {
                (
                    r.candidates.into_iter().map(|c| (c.subject, c.score)).collect(),
                    r.matched,
                )
            })
            .collect();
        to_numpy(py, k, threshold, answers)
    }

    /// Enroll one template per row under `subjects[i]`; returns the templates the
    /// server made durable.
    fn enroll(
        &self,
        py: Python<'_>,
        gallery: &str,
        subjects: Vec<String>,
        templates: &Bound<'_, PyAny>,
    ) -> PyResult<u64> {
        let (array, dim) = templates_for(py, templates, subjects.len())?;
        let values = rows(&array, "templates")?;
        let values: &[f32] = &values;
        let reply = self.call(py, self.client.enroll(gallery, values, dim, &subjects))?;
        Ok(reply.templates)
    }

    /// 1:1 on the server: the score of `probe` (a 1-D array of dim values) against
    /// `subject`'s best template (NotFoundError if the subject is not enrolled there).
    fn verify(&self, py: Python<'_>, gallery: &str, probe: Vec<f32>, subject: &str) -> PyResult<f32> {
        let reply = self.call(py, self.client.verify(gallery, &probe, subject, None))?;
        Ok(reply.score)
    }

    /// Delete a subject from the server's gallery.
    fn delete(&self, py: Python<'_>, gallery: &str, subject: &str) -> PyResult<()> {
        self.call(py, self.client.delete_subject(gallery, subject))
    }

    /// The names of the server's galleries.
    fn galleries(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let list = self.call(py, self.client.list_galleries())?;
        Ok(list.into_iter().map(|g| g.name).collect())
    }
}

/// `biogate eval` on the gallery at `path` (read-only: it may be open elsewhere):
/// the report as a dict. See `Gallery.eval`.
#[pyfunction(name = "eval")]
#[pyo3(signature = (path, mated, mated_ids, nonmated, k = 20, rank = 1, backend = "auto"))]
#[allow(clippy::too_many_arguments)]
fn eval_at(
    py: Python<'_>,
    path: PathBuf,
    mated: &Bound<'_, PyAny>,
    mated_ids: Vec<String>,
    nonmated: &Bound<'_, PyAny>,
    k: usize,
    rank: usize,
    backend: &str,
) -> PyResult<Py<PyAny>> {
    let choice: BackendChoice = backend.parse().map_err(py_err)?;
    let searches = Searches { mated_ids, k, rank };
    eval_with(py, mated, nonmated, searches, move || {
        let snapshot = Arc::new(::biogate::gallery::open_snapshot(&path)?);
        let (engine, _) = open_engine(choice)?;
        Ok((snapshot, engine))
    })
}

/// Templates to enroll (rows x dim) with one subject per row: the array and dim.
fn templates_for<'py>(
    py: Python<'py>,
    templates: &Bound<'py, PyAny>,
    subjects: usize,
) -> PyResult<(PyReadonlyArray2<'py, f32>, usize)> {
    let array = as_matrix(py, templates, "templates")?;
    let (rows, dim) = (array.shape()[0], array.shape()[1]);
    if rows != subjects {
        return Err(PyValueError::new_err(format!(
            "{subjects} subjects for {rows} template rows"
        )));
    }
    Ok((array, dim))
}

/// What an evaluation searches for.
struct Searches {
    mated_ids: Vec<String>,
    k: usize,
    rank: usize,
}

/// `evaluate` with the GIL released, on the snapshot and engine `open` gives: the
/// report as a dict.
fn eval_with(
    py: Python<'_>,
    mated: &Bound<'_, PyAny>,
    nonmated: &Bound<'_, PyAny>,
    s: Searches,
    open: impl FnOnce() -> ::biogate::Result<(Arc<::biogate::Snapshot>, Engine)> + Send,
) -> PyResult<Py<PyAny>> {
    let mated = as_matrix(py, mated, "mated")?;
    let nonmated = as_matrix(py, nonmated, "nonmated")?;
    let (m, n) = (rows(&mated, "mated")?, rows(&nonmated, "nonmated")?);
    let (m, n): (&[f32], &[f32]) = (&m, &n);
    let report = py
        .detach(|| {
            let (snapshot, engine) = open()?;
            ::biogate::eval::evaluate(&engine, &snapshot, m, &s.mated_ids, n, s.k, s.rank)
        })
        .map_err(py_err)?;
    as_python(py, &report)
}

/// What identify returns to Python.
type Answers<'py> = (
    Vec<Vec<String>>,
    Bound<'py, PyArray2<f32>>,
    Option<Bound<'py, PyArray1<bool>>>,
);

/// Per probe its (subject, score) candidates, best first, and the decision, as identify
/// returns them: subjects as lists, scores as a float32 array (probes x k, NaN where
/// there is no candidate), decisions as a bool array when a threshold was given.
fn to_numpy(
    py: Python<'_>,
    k: usize,
    threshold: Option<f32>,
    answers: Vec<(Vec<(String, f32)>, bool)>,
) -> PyResult<Answers<'_>> {
    let mut scores = vec![f32::NAN; answers.len() * k];
    let mut subjects = Vec::with_capacity(answers.len());
    let mut matched = Vec::with_capacity(answers.len());
    for (q, (candidates, decision)) in answers.into_iter().enumerate() {
        for (i, (_, score)) in candidates.iter().take(k).enumerate() {
            scores[q * k + i] = *score;
        }
        subjects.push(candidates.into_iter().map(|(subject, _)| subject).collect());
        matched.push(decision);
    }
    let rows = subjects.len();
    let scores = PyArray1::from_vec(py, scores).reshape([rows, k])?;
    Ok((subjects, scores, threshold.map(|_| PyArray1::from_vec(py, matched))))
}

/// `biogate dedup` on the gallery at `path`: the pairs as `(subject_a, subject_b,
/// scores)`, also written to the CSV `out`. See `Gallery.dedup`.
#[pyfunction(name = "dedup")]
#[pyo3(signature = (path, out, threshold = None, top = None, batch = 1024, backend = "auto"))]
#[allow(clippy::type_complexity)]
fn dedup_at<'py>(
    py: Python<'py>,
    path: PathBuf,
    out: PathBuf,
    threshold: Option<f32>,
    top: Option<usize>,
    batch: usize,
    backend: &str,
) -> PyResult<(Vec<String>, Vec<String>, Bound<'py, PyArray1<f32>>)> {
    let choice: BackendChoice = backend.parse().map_err(py_err)?;
    let options = ::biogate::dedup::DedupOptions { threshold, top, batch };
    let written = out.clone();
    py.detach(|| {
        let (engine, _) = open_engine(choice)?;
        ::biogate::dedup::dedup(&engine, &path, options, &written, &mut |_, _| true)
    })
    .map_err(py_err)?;
    read_pairs(py, &out)
}

/// The pairs of a dedup CSV: two id lists and a float32 array of scores.
#[allow(clippy::type_complexity)]
fn read_pairs<'py>(
    py: Python<'py>,
    out: &std::path::Path,
) -> PyResult<(Vec<String>, Vec<String>, Bound<'py, PyArray1<f32>>)> {
    let text =
        std::fs::read_to_string(out).map_err(|e| StorageError::new_err(format!("reading {}: {e}", out.display())))?;
    let (mut a, mut b, mut scores) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        if let [x, y, s] = csv_fields(line).as_slice() {
            a.push(x.clone());
            b.push(y.clone());
            scores.push(
                s.parse::<f32>()
                    .map_err(|e| Error::new_err(format!("{}: {e}", out.display())))?,
            );
        }
    }
    Ok((a, b, PyArray1::from_vec(py, scores)))
}

/// Whether `array` is read in place by biogate's calls (a float32 C-contiguous matrix)
/// rather than converted once.
#[pyfunction]
fn reads_in_place(py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<bool> {
    let is_f32_matrix = array.extract::<PyReadonlyArray2<'_, f32>>();
    Ok(match is_f32_matrix {
        Ok(a) => matches!(rows(&a, "array")?, std::borrow::Cow::Borrowed(_)),
        Err(_) => {
            let _ = as_matrix(py, array, "array")?;
            false
        }
    })
}

/// biogate: exact 1:N biometric identification, numpy in and out.
#[pymodule(name = "biogate")]
fn biogate_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGallery>()?;
    m.add_class::<PyClient>()?;
    m.add_function(wrap_pyfunction!(reads_in_place, m)?)?;
    m.add_function(wrap_pyfunction!(eval_at, m)?)?;
    m.add_function(wrap_pyfunction!(dedup_at, m)?)?;
    m.add("Error", m.py().get_type::<Error>())?;
    m.add("NotFoundError", m.py().get_type::<NotFoundError>())?;
    m.add("CorruptError", m.py().get_type::<CorruptError>())?;
    m.add("StorageError", m.py().get_type::<StorageError>())?;
    m.add("GpuError", m.py().get_type::<GpuError>())?;
    Ok(())
}
