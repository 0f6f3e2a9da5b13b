//! Reading and writing template matrices as NumPy `.npy` files (float32 or float16,
//! C order, shape `(rows, dim)`), streamed in chunks so a file larger than memory can
//! be imported. Headers are parsed and written by `npyz`; the data is moved as raw
//! little-endian bytes.

use crate::error::{Error, IoContext, Result};
use crate::gallery::ImportSource;
use npyz::WriterBuilder;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq)]
enum Elem {
    F32,
    F16,
}

/// A `.npy` matrix opened for reading rows in order.
pub struct NpyMatrixReader {
    path: PathBuf,
    reader: BufReader<File>,
    elem: Elem,
    rows: u64,
    dim: usize,
    read: u64,
    bytes: Vec<u8>,
}

impl NpyMatrixReader {
    /// Open and check the header: float32 or float16, little-endian, C order, 1-D or 2-D.
    pub fn open(path: &Path) -> Result<NpyMatrixReader> {
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let header = npyz::NpyHeader::from_reader(&mut reader)
            .map_err(|e| Error::invalid(format!("{}: not a valid .npy file: {e}", path.display())))?;
        let descr = match header.dtype() {
            npyz::DType::Plain(t) => t.to_string(),
            other => other.descr(),
        };
        let elem = match descr.as_str() {
            "<f4" => Elem::F32,
            "<f2" => Elem::F16,
            other => {
                return Err(Error::invalid(format!(
                    "{}: dtype {other} is not supported (use little-endian float32 or float16)",
                    path.display()
                )));
            }
        };
        if header.order() != npyz::Order::C {
            return Err(Error::invalid(format!(
                "{}: Fortran order is not supported",
                path.display()
            )));
        }
        let (rows, dim) = match *header.shape() {
            [d] => (1, d),
            [r, d] => (r, d),
            ref s => {
                return Err(Error::invalid(format!(
                    "{}: shape {s:?} is not a matrix (rows, dim)",
                    path.display()
                )));
            }
        };
        // A file cut short is named with its last whole row, before any row is read.
        let elem_bytes: u64 = if elem == Elem::F32 { 4 } else { 2 };
        let row_bytes = dim * elem_bytes;
        let header_bytes = reader.stream_position().ctx(|| format!("reading {}", path.display()))?;
        let file_bytes = reader
            .get_ref()
            .metadata()
            .ctx(|| format!("reading {}", path.display()))?
            .len();
        let whole_rows = file_bytes
            .saturating_sub(header_bytes)
            .checked_div(row_bytes)
            .unwrap_or(rows);
        if whole_rows < rows {
            let last = match whole_rows {
                0 => "it holds no whole row".to_owned(),
                n => format!("its last whole row is row {} (0-based)", n - 1),
            };
            return Err(Error::invalid(format!(
                "{} is cut short: its header promises {rows} rows of {dim} values, {last}",
                path.display()
            )));
        }
        Ok(NpyMatrixReader {
            path: path.to_path_buf(),
            reader,
            elem,
            rows,
            dim: dim as usize,
            read: 0,
            bytes: Vec::new(),
        })
    }

    /// Components per row.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Rows in the file.
    pub fn rows(&self) -> u64 {
        self.rows
    }
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append up to `max_rows` rows as f32 to `out`; returns the number read (0 at the end).
    pub fn read_rows(&mut self, max_rows: usize, out: &mut Vec<f32>) -> Result<usize> {
        let n = (self.rows - self.read).min(max_rows as u64) as usize;
        if n == 0 || self.dim == 0 {
            return Ok(0);
        }
        let elem_bytes = if self.elem == Elem::F32 { 4 } else { 2 };
        self.bytes.resize(n * self.dim * elem_bytes, 0);
        self.reader.read_exact(&mut self.bytes).map_err(|e| {
            Error::invalid(format!(
                "{}: data ends early (after row {} of {}): {e}",
                self.path.display(),
                self.read,
                self.rows
            ))
        })?;
        match self.elem {
            Elem::F32 => out.extend(
                self.bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Elem::F16 => out.extend(
                self.bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
        self.read += n as u64;
        Ok(n)
    }
}

/// Read a whole (small) matrix: `(rows, dim, values)`.
pub fn read_matrix(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let mut r = NpyMatrixReader::open(path)?;
    let mut values = Vec::with_capacity(r.rows() as usize * r.dim());
    while r.read_rows(1 << 16, &mut values)? > 0 {}
    Ok((r.rows() as usize, r.dim(), values))
}

/// Writes a float32 `(rows, dim)` matrix row chunk by row chunk.
pub struct NpyMatrixWriter {
    path: PathBuf,
    out: BufWriter<File>,
    remaining: u64,
}

impl NpyMatrixWriter {
    /// Create `path` for `rows` rows of `dim` float32 values.
    pub fn create(path: &Path, rows: u64, dim: usize) -> Result<NpyMatrixWriter> {
        let file = File::create(path).ctx(|| format!("creating {}", path.display()))?;
        let out = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&[rows, dim as u64])
            .writer(BufWriter::with_capacity(1 << 20, file))
            .write_header_only()
            .ctx(|| format!("writing {}", path.display()))?;
        Ok(NpyMatrixWriter {
            path: path.to_path_buf(),
            out,
            remaining: rows * dim as u64,
        })
    }

    /// Append values (whole rows).
    pub fn write(&mut self, values: &[f32]) -> Result<()> {
        assert!(
            values.len() as u64 <= self.remaining,
            "more values than the header promised"
        );
        self.remaining -= values.len() as u64;
        self.out
            .write_all(bytemuck::cast_slice(values))
            .ctx(|| format!("writing {}", self.path.display()))
    }

    /// Flush; every promised value must have been written.
    pub fn finish(mut self) -> Result<()> {
        assert_eq!(self.remaining, 0, "fewer values than the header promised");
        self.out.flush().ctx(|| format!("writing {}", self.path.display()))
    }
}

/// Write a whole matrix.
pub fn write_matrix(path: &Path, dim: usize, values: &[f32]) -> Result<()> {
    let mut w = NpyMatrixWriter::create(path, (values.len() / dim) as u64, dim)?;
    w.write(values)?;
    w.finish()
}

/// Read an id list: one subject id per line (a final empty line is fine).
pub fn read_ids(path: &Path) -> Result<Vec<String>> {
    let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut ids = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.ctx(|| format!("reading {}", path.display()))?;
        ids.push(id_line(path, i + 1, line)?);
    }
    if ids.last().is_some_and(|id| id.is_empty()) {
        ids.pop();
    }
    check_no_empty(path, &ids, 0)?;
    Ok(ids)
}

/// One line of an ids file as a subject id: a Windows line end and, on line 1, a UTF-8
/// byte-order mark are not part of it; spaces around it are an error naming the line
/// (an id with a stray space would be another subject).
fn id_line(path: &Path, line_no: usize, line: String) -> Result<String> {
    let mut id = line.trim_end_matches('\r');
    if line_no == 1 {
        id = id.strip_prefix('\u{feff}').unwrap_or(id);
    }
    if id.trim() != id {
        return Err(Error::invalid(format!(
            "{} line {line_no}: subject id {id:?} has spaces around it",
            path.display()
        )));
    }
    Ok(id.to_owned())
}

/// An empty id (an empty line before the end) is an error naming its line.
fn check_no_empty(path: &Path, ids: &[String], first_line: u64) -> Result<()> {
    match ids.iter().position(|id| id.is_empty()) {
        Some(i) => Err(Error::invalid(format!(
            "{} line {}: empty subject id",
            path.display(),
            first_line + i as u64 + 1
        ))),
        None => Ok(()),
    }
}

/// Write an id list.
pub fn write_ids(path: &Path, ids: &[String]) -> Result<()> {
    let mut out = BufWriter::new(File::create(path).ctx(|| format!("creating {}", path.display()))?);
    for id in ids {
        writeln!(out, "{id}").ctx(|| format!("writing {}", path.display()))?;
    }
    out.flush().ctx(|| format!("writing {}", path.display()))
}

/// Import source: a `.npy` template matrix plus a text file of subject ids, one per row.
pub struct NpyImport {
    npy: NpyMatrixReader,
    ids_path: PathBuf,
    ids: std::io::Lines<BufReader<File>>,
    ids_read: u64,
}

impl NpyImport {
    /// Open both files.
    pub fn open(templates: &Path, ids: &Path) -> Result<NpyImport> {
        let npy = NpyMatrixReader::open(templates)?;
        let file = File::open(ids).ctx(|| format!("opening {}", ids.display()))?;
        Ok(NpyImport {
            npy,
            ids_path: ids.to_path_buf(),
            ids: BufReader::new(file).lines(),
            ids_read: 0,
        })
    }
}

impl ImportSource for NpyImport {
    fn dim(&self) -> usize {
        self.npy.dim()
    }

    fn rows_hint(&self) -> Option<u64> {
        Some(self.npy.rows())
    }

    fn read_chunk(&mut self, max_rows: usize, values: &mut Vec<f32>, ids: &mut Vec<String>) -> Result<usize> {
        let n = self.npy.read_rows(max_rows, values)?;
        for _ in 0..n {
            match self.ids.next() {
                Some(line) => {
                    let line = line.ctx(|| format!("reading {}", self.ids_path.display()))?;
                    let id = id_line(&self.ids_path, self.ids_read as usize + 1, line)?;
                    check_no_empty(&self.ids_path, std::slice::from_ref(&id), self.ids_read)?;
                    ids.push(id);
                    self.ids_read += 1;
                }
                None => {
                    return Err(Error::invalid(format!(
                        "{} has {} lines but {} has {} rows",
                        self.ids_path.display(),
                        self.ids_read,
                        self.npy.path().display(),
                        self.npy.rows()
                    )));
                }
            }
        }
        if n == 0 {
            let extra = self
                .ids
                .by_ref()
                .filter(|l| !matches!(l, Ok(s) if s.trim().is_empty()))
                .count();
            if extra > 0 {
                return Err(Error::invalid(format!(
                    "{} has {} more lines than {} has rows ({})",
                    self.ids_path.display(),
                    extra,
                    self.npy.path().display(),
                    self.npy.rows()
                )));
            }
        }
        Ok(n)
    }

    fn label(&self) -> String {
        self.npy.path().display().to_string()
    }
}

/// Import source over rows in memory.
pub struct MemoryImport<'a> {
    dim: usize,
    values: &'a [f32],
    ids: &'a [String],
    at: usize,
}

impl<'a> MemoryImport<'a> {
    /// `values` is `ids.len() * dim` long.
    pub fn new(dim: usize, values: &'a [f32], ids: &'a [String]) -> Result<MemoryImport<'a>> {
        if dim == 0 || values.len() != ids.len() * dim {
            return Err(Error::invalid(format!(
                "{} values do not make {} rows of dimension {dim}",
                values.len(),
                ids.len()
            )));
        }
        Ok(MemoryImport {
            dim,
            values,
            ids,
            at: 0,
        })
    }
}

impl ImportSource for MemoryImport<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn rows_hint(&self) -> Option<u64> {
        Some(self.ids.len() as u64)
    }
    fn read_chunk(&mut self, max_rows: usize, values: &mut Vec<f32>, ids: &mut Vec<String>) -> Result<usize> {
        let n = (self.ids.len() - self.at).min(max_rows);
        values.extend_from_slice(&self.values[self.at * self.dim..(self.at + n) * self.dim]);
        ids.extend_from_slice(&self.ids[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod id_file_tests {
    use super::*;

    #[test]
    fn ids_files_drop_a_bom_and_line_ends_and_refuse_spaces_and_empty_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ids.txt");
        std::fs::write(&path, "\u{feff}alice\r\nbob\r\n").unwrap();
        assert_eq!(read_ids(&path).unwrap(), ["alice", "bob"]);
        std::fs::write(&path, "alice\nbob \ncarol\n").unwrap();
        let e = read_ids(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("\"bob \""), "{e}");
        std::fs::write(&path, "alice\n\ncarol\n").unwrap();
        let e = read_ids(&path).unwrap_err().to_string();
        assert!(e.contains("line 2: empty subject id"), "{e}");
    }

    #[test]
    fn a_matrix_cut_short_names_its_last_whole_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.npy");
        write_matrix(&path, 4, &[0.5; 40]).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(len - 4 * 4 - 2).unwrap(); // row 9 and half of row 8's last value
        let e = NpyMatrixReader::open(&path).err().unwrap().to_string();
        assert!(
            e.contains("promises 10 rows") && e.contains("last whole row is row 7"),
            "{e}"
        );
        let ids = dir.path().join("ids.txt");
        std::fs::write(&ids, "a\n").unwrap();
        assert!(NpyImport::open(&path, &ids).is_err());
    }
}
