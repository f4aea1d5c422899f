//! The streaming reader: files -> row groups -> record batches -> checked samples.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use ::parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder,
};
use ::parquet::arrow::ProjectionMask;
use arrow_array::RecordBatch;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::columns::Layout;
use super::{DataStats, DatasetSpec, OnBadRow, RowSource, Sample};
use crate::{Error, Result};

/// One parquet file: its footer, the columns used, and the first row of each row group.
struct DataFile {
    path: Arc<Path>,
    meta: ArrowReaderMetadata,
    layout: Layout,
    group_start: Vec<usize>,
    rows: usize,
}

/// The row group being read.
struct OpenGroup {
    file: usize,
    batches: ParquetRecordBatchReader,
    /// Row (in the file) of the next batch's first row.
    next_row: usize,
}

/// Streams the samples of a [`DatasetSpec`], one epoch at a time: iterate until `None`, then
/// call [`DatasetReader::next_epoch`]. After an error the iteration ends until the next
/// `set_epoch`/`next_epoch`/`reset`.
pub struct DatasetReader {
    spec: DatasetSpec,
    files: Vec<DataFile>,
    epoch: u64,
    rng: StdRng,
    /// (file, row group) in this epoch's order.
    groups: Vec<(usize, usize)>,
    next_group: usize,
    open: Option<OpenGroup>,
    /// Checked rows of the last batch, in file order; an error ends the batch.
    ready: VecDeque<Result<Sample>>,
    /// The shuffle buffer.
    buffer: Vec<Sample>,
    done: bool,
    stats: DataStats,
}

impl DatasetReader {
    /// Reads every file's footer and checks its columns against the spec, then starts epoch 0.
    pub fn open(spec: DatasetSpec) -> Result<Self> {
        let invalid = |msg: &str| Err(Error::invalid("DatasetReader::open", msg));
        if spec.parquet_files.is_empty() {
            return invalid("no parquet files given");
        }
        if spec.activation_dim == 0 {
            return invalid("activation_dim must be at least 1");
        }
        if spec.batch_rows == 0 {
            return invalid("batch_rows must be at least 1");
        }
        if spec.needs_prompt() && spec.injection_token.is_empty() {
            return invalid("injection_token is empty");
        }
        let files = spec
            .parquet_files
            .iter()
            .map(|path| open_file(&spec, path))
            .collect::<Result<Vec<_>>>()?;
        let mut reader = DatasetReader {
            spec,
            files,
            epoch: 0,
            rng: StdRng::seed_from_u64(0),
            groups: vec![],
            next_group: 0,
            open: None,
            ready: VecDeque::new(),
            buffer: vec![],
            done: false,
            stats: DataStats::default(),
        };
        reader.set_epoch(0);
        Ok(reader)
    }

    pub fn spec(&self) -> &DatasetSpec {
        &self.spec
    }

    /// Rows in all files, bad ones included.
    pub fn num_rows(&self) -> usize {
        self.files.iter().map(|f| f.rows).sum()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counts since the reader was opened, over all epochs.
    pub fn stats(&self) -> &DataStats {
        &self.stats
    }

    /// Restarts at the beginning of `epoch`; the order depends only on the seed and `epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.rng =
            StdRng::seed_from_u64(self.spec.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.files.len()).collect();
        if self.spec.shuffle {
            order.shuffle(&mut self.rng);
        }
        self.groups.clear();
        for f in order {
            let mut groups: Vec<usize> = (0..self.files[f].group_start.len()).collect();
            if self.spec.shuffle {
                groups.shuffle(&mut self.rng);
            }
            self.groups.extend(groups.into_iter().map(|g| (f, g)));
        }
        self.next_group = 0;
        self.open = None;
        self.ready.clear();
        self.buffer.clear();
        self.done = false;
    }

    pub fn next_epoch(&mut self) {
        self.set_epoch(self.epoch + 1);
    }

    /// Restarts the current epoch from its beginning.
    pub fn reset(&mut self) {
        self.set_epoch(self.epoch);
    }

    /// The next checked row in file order (row groups shuffled when shuffling).
    fn next_row(&mut self) -> Option<Result<Sample>> {
        loop {
            if let Some(row) = self.ready.pop_front() {
                return Some(row);
            }
            let Some(open) = self.open.as_mut() else {
                let &(file, group) = self.groups.get(self.next_group)?;
                self.next_group += 1;
                match self.open_group(file, group) {
                    Ok(open) => self.open = Some(open),
                    Err(e) => return Some(Err(e)),
                }
                continue;
            };
            let file = &self.files[open.file];
            match open.batches.next() {
                None => self.open = None,
                Some(Err(e)) => {
                    let msg = format!("reading from row {}: {e}", open.next_row);
                    return Some(Err(Error::format(file.path.as_ref(), msg)));
                }
                Some(Ok(batch)) => {
                    let first = open.next_row;
                    open.next_row += batch.num_rows();
                    let (ready, stats) = (&mut self.ready, &mut self.stats);
                    if let Err(e) = check_batch(&self.spec, file, &batch, first, ready, stats) {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    fn open_group(&self, file: usize, group: usize) -> Result<OpenGroup> {
        let f = &self.files[file];
        let handle = File::open(&f.path).map_err(|e| Error::io(f.path.as_ref(), e))?;
        let roots = f.layout.roots.iter().copied();
        let mask = ProjectionMask::roots(f.meta.parquet_schema(), roots);
        let batches = ParquetRecordBatchReaderBuilder::new_with_metadata(handle, f.meta.clone())
            .with_projection(mask)
            .with_row_groups(vec![group])
            .with_batch_size(self.spec.batch_rows)
            .build()
            .map_err(|e| Error::format(f.path.as_ref(), format!("row group {group}: {e}")))?;
        Ok(OpenGroup {
            file,
            batches,
            next_row: f.group_start[group],
        })
    }

    /// The next row through the shuffle buffer (when shuffling with a buffer of 2 or more).
    fn next_shuffled(&mut self) -> Option<Result<Sample>> {
        let capacity = if self.spec.shuffle {
            self.spec.shuffle_buffer
        } else {
            0
        };
        if capacity < 2 {
            return self.next_row();
        }
        while self.buffer.len() < capacity {
            match self.next_row() {
                Some(Ok(sample)) => self.buffer.push(sample),
                Some(Err(e)) => return Some(Err(e)),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let j = self.rng.random_range(0..self.buffer.len());
        Some(Ok(self.buffer.swap_remove(j)))
    }
}

impl Iterator for DatasetReader {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Result<Sample>> {
        if self.done {
            return None;
        }
        let next = self.next_shuffled();
        match next {
            Some(Ok(_)) => self.stats.samples += 1,
            _ => self.done = true,
        }
        next
    }
}

fn open_file(spec: &DatasetSpec, path: &Path) -> Result<DataFile> {
    let handle = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = ArrowReaderMetadata::load(&handle, Default::default())
        .map_err(|e| Error::format(path, format!("not a readable parquet file: {e}")))?;
    let layout = Layout::new(spec, meta.schema(), path)?;
    let mut group_start = vec![];
    let mut rows = 0;
    for group in meta.metadata().row_groups() {
        group_start.push(rows);
        rows += usize::try_from(group.num_rows())
            .map_err(|_| Error::format(path, "a row group has a negative row count"))?;
    }
    Ok(DataFile {
        path: Arc::from(path),
        meta,
        layout,
        group_start,
        rows,
    })
}

/// Checks the rows of one batch into `ready`; a bad row becomes an error there (which ends
/// the batch) or is counted, as the policy says.
fn check_batch(
    spec: &DatasetSpec,
    file: &DataFile,
    batch: &RecordBatch,
    first_row: usize,
    ready: &mut VecDeque<Result<Sample>>,
    stats: &mut DataStats,
) -> Result<()> {
    let columns = file.layout.columns(spec, batch, &file.path)?;
    for i in 0..batch.num_rows() {
        stats.rows_read += 1;
        let row = first_row + i;
        match columns.row(i) {
            Ok(v) => ready.push_back(Ok(Sample {
                prompt: v.prompt,
                response: v.response,
                vectors: v.vectors,
                extra: v.extra,
                source: RowSource {
                    file: file.path.clone(),
                    row,
                },
            })),
            Err(bad) => match bad.class {
                Some(class) if spec.on_bad_row.get(class) == OnBadRow::Skip => {
                    *stats.skipped.entry(class).or_insert(0) += 1;
                }
                _ => {
                    ready.push_back(Err(Error::Data {
                        path: file.path.to_path_buf(),
                        row,
                        column: bad.column,
                        msg: bad.msg,
                    }));
                    break;
                }
            },
        }
    }
    Ok(())
}
