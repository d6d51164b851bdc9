//! Where a weight matrix sits in memory while GGML multiplies by it.
//!
//! llama.cpp's default load maps the GGUF file read-only and lets the CPU
//! backend read the page cache in place (`CPU_Mapped` buffers); with
//! `--no-mmap` it copies the weights into an anonymous buffer; types the CPU
//! backend repacks are copied into its repack buffer either way. A
//! [`StagedMatrix`] reproduces the first two for synthetic weights (the third
//! is chosen by [`crate::MatMul`]), so a kernel cell reads the same kind of
//! pages a model load would give the same tensor. [`PageState`] reports what
//! the kernel actually got (page size, transparent huge pages), read back from
//! `/proc/self/smaps`.

use crate::{KernelError, QuantizedMatrix};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use wire::ggml_type::GgmlType;
pub use wire::kernel_job::LoadMode;

/// A quantized matrix placed as llama.cpp would place it after loading.
pub struct StagedMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    storage: Storage,
}

enum Storage {
    /// Ordinary heap bytes; `MatMul` copies them into a GGML buffer.
    Heap(Vec<u8>),
    /// A read-only shared mapping of a file holding the bytes.
    Mapped(Arc<FileMapping>),
}

impl StagedMatrix {
    /// `NoMmap` keeps the bytes for copying into a GGML buffer; `Mmap` writes
    /// them to an unnamed file in `scratch_dir` (flushed to disk, so its page
    /// cache is clean like a model file's) and maps it.
    pub fn stage(
        matrix: QuantizedMatrix,
        mode: LoadMode,
        scratch_dir: &Path,
    ) -> Result<Self, KernelError> {
        let (ty, rows, cols) = (matrix.ty(), matrix.rows(), matrix.cols());
        let storage = match mode {
            LoadMode::NoMmap => Storage::Heap(matrix.into_bytes()),
            LoadMode::Mmap => {
                Storage::Mapped(Arc::new(FileMapping::of_bytes(matrix.raw(), scratch_dir)?))
            }
        };
        Ok(StagedMatrix {
            ty,
            rows,
            cols,
            storage,
        })
    }

    /// Writes the quantized bytes to `path` (synced, so the page cache is
    /// clean like a model file's) for other processes of the run to
    /// [`StagedMatrix::open`]: each invocation of a cell maps its weights
    /// afresh, as each model load would.
    pub fn write_file(matrix: &QuantizedMatrix, path: &Path) -> Result<(), KernelError> {
        let staging = |reason: String| KernelError::Staging {
            dir: path.to_path_buf(),
            reason,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| staging(format!("creating the file: {e}")))?;
        file.write_all(matrix.raw())
            .and_then(|_| file.sync_data())
            .map_err(|e| staging(format!("writing the weights: {e}")))
    }

    /// The matrix a [`StagedMatrix::write_file`] wrote, placed by `mode`:
    /// `Mmap` maps the file in place, `NoMmap` reads it into memory.
    pub fn open(
        path: &Path,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        mode: LoadMode,
    ) -> Result<Self, KernelError> {
        let staging = |reason: String| KernelError::Staging {
            dir: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| staging(format!("opening: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| staging(format!("reading its size: {e}")))?
            .len() as usize;
        let expected = ty.row_bytes(cols) * rows;
        if len != expected {
            return Err(staging(format!(
                "holds {len} bytes, a {ty} {rows}x{cols} matrix has {expected}"
            )));
        }
        let storage = match mode {
            LoadMode::NoMmap => {
                Storage::Heap(std::fs::read(path).map_err(|e| staging(format!("reading: {e}")))?)
            }
            LoadMode::Mmap => Storage::Mapped(Arc::new(FileMapping::of_file(&file, len, path)?)),
        };
        Ok(StagedMatrix {
            ty,
            rows,
            cols,
            storage,
        })
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn bytes(&self) -> usize {
        self.raw().len()
    }
    pub fn raw(&self) -> &[u8] {
        match &self.storage {
            Storage::Heap(bytes) => bytes,
            Storage::Mapped(mapping) => mapping.bytes(),
        }
    }
    pub fn load_mode(&self) -> LoadMode {
        match self.storage {
            Storage::Heap(_) => LoadMode::NoMmap,
            Storage::Mapped(_) => LoadMode::Mmap,
        }
    }
    pub(crate) fn mapping(&self) -> Option<Arc<FileMapping>> {
        match &self.storage {
            Storage::Heap(_) => None,
            Storage::Mapped(mapping) => Some(Arc::clone(mapping)),
        }
    }
}

/// A read-only `MAP_SHARED` mapping of a file that exists only while mapped.
pub(crate) struct FileMapping {
    address: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; reading it from
// several threads at once is what GGML's workers do with model mappings.
unsafe impl Send for FileMapping {}
unsafe impl Sync for FileMapping {}

impl FileMapping {
    fn of_bytes(bytes: &[u8], dir: &Path) -> Result<Self, KernelError> {
        let io_error = |what: &str, e: std::io::Error| KernelError::Staging {
            dir: dir.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        if bytes.is_empty() {
            return Err(io_error("mapping", std::io::Error::other("empty matrix")));
        }
        let mut file = unnamed_file(dir).map_err(|e| io_error("creating the file", e))?;
        file.write_all(bytes)
            .map_err(|e| io_error("writing the weights", e))?;
        // Clean pages: nothing is written back to disk while cells are timed.
        file.sync_data()
            .map_err(|e| io_error("flushing the weights", e))?;
        Self::of_file(&file, bytes.len(), dir)
    }

    /// Maps `len` bytes of `file` as llama.cpp maps a model; `path` names
    /// it in errors.
    fn of_file(file: &File, len: usize, path: &Path) -> Result<Self, KernelError> {
        let io_error = |what: &str, e: std::io::Error| KernelError::Staging {
            dir: path.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        if len == 0 {
            return Err(io_error("mapping", std::io::Error::other("empty matrix")));
        }
        // SAFETY: plain syscalls on a file descriptor we own; the mapping is
        // checked for MAP_FAILED and owned (unmapped on drop) by the result.
        unsafe {
            // What llama.cpp's loader asks of the file before mapping it.
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
            let address = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            );
            if address == libc::MAP_FAILED {
                return Err(io_error("mapping", std::io::Error::last_os_error()));
            }
            Ok(FileMapping { address, len })
        }
    }

    pub(crate) fn address(&self) -> *mut libc::c_void {
        self.address
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` readable bytes live at `address` until drop.
        unsafe { std::slice::from_raw_parts(self.address.cast::<u8>(), self.len) }
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region this value mapped.
        unsafe {
            libc::munmap(self.address, self.len);
        }
    }
}

/// A file with no name (`O_TMPFILE`), so nothing is left behind if the agent
/// is killed; where the file system cannot do that, a named file that is
/// unlinked at once.
fn unnamed_file(dir: &Path) -> std::io::Result<File> {
    let unnamed = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    match unnamed {
        Ok(file) => Ok(file),
        Err(_) => {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = dir.join(format!(
                ".staged-weights-{}-{}.tmp",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::remove_file(&path)?;
            Ok(file)
        }
    }
}

/// The pages backing a region, as the kernel reports them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageState {
    /// Base page size of the mapping (4 KiB on x86-64; 4 or 16 KiB on arm64).
    pub page_kib: u64,
    /// Share of the resident bytes mapped by huge pages (transparent huge
    /// pages or PMD-mapped page cache), 0 to 1.
    pub huge_share: f64,
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}k", self.page_kib)?;
        if self.huge_share > 0.0 {
            write!(f, "+thp{:.0}%", self.huge_share * 100.0)?;
        }
        Ok(())
    }
}

impl PageState {
    /// The state of the mapping that contains `address`, from
    /// `/proc/self/smaps`; `None` where that file does not exist.
    pub fn of_address(address: usize) -> Option<PageState> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        parse_smaps_entry(&smaps, address)
    }
}

fn parse_smaps_entry(smaps: &str, address: usize) -> Option<PageState> {
    let mut inside = false;
    let (mut page_kib, mut rss_kib, mut huge_kib) = (None, 0u64, 0u64);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                if inside {
                    break;
                }
                inside = (start..end).contains(&address);
                continue;
            }
        }
        if !inside {
            continue;
        }
        let kib = fields
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "KernelPageSize:" => page_kib = Some(kib),
            "Rss:" => rss_kib = kib,
            "AnonHugePages:" | "FilePmdMapped:" | "ShmemPmdMapped:" => huge_kib += kib,
            _ => {}
        }
    }
    let huge_share = if rss_kib == 0 {
        0.0
    } else {
        huge_kib as f64 / rss_kib as f64
    };
    Some(PageState {
        page_kib: page_kib?,
        huge_share,
    })
}

/// Drops `path`'s pages from the page cache, as a reboot would (written
/// pages are flushed first: only clean pages can be dropped), and says
/// whether none stayed resident, so a following load reads the file from
/// storage: a cold load. Needs no privilege (`posix_fadvise`).
pub fn drop_file_pages(path: &Path) -> std::io::Result<bool> {
    let file = File::open(path)?;
    let len = file.metadata()?.len() as usize;
    file.sync_all()?;
    // SAFETY: a valid descriptor; advice only.
    let status = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if status != 0 {
        return Err(std::io::Error::from_raw_os_error(status));
    }
    if len == 0 {
        return Ok(true);
    }
    // Read back which pages stayed (another process may be mapping them).
    // SAFETY: a fresh read-only shared mapping of the whole file, unmapped
    // below; mincore writes one byte per page into a vector of that size.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(1) as usize;
        let mut resident = vec![0u8; len.div_ceil(page)];
        let status = libc::mincore(map, len, resident.as_mut_ptr());
        let error = std::io::Error::last_os_error();
        libc::munmap(map, len);
        if status != 0 {
            return Err(error);
        }
        Ok(resident.iter().all(|r| r & 1 == 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize;
    use crate::weights::llm_like_weights;

    #[test]
    fn a_written_file_s_pages_are_dropped_for_a_cold_read() {
        // On a disk-backed folder (tmpfs pages are the file and stay).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("weights.bin");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let _ = std::fs::read(&path).unwrap();
        assert!(drop_file_pages(&path).unwrap());
        // Mapped and locked by someone: the pages stay, and it says so.
        let file = File::open(&path).unwrap();
        // SAFETY: a read-only mapping of the file, unmapped below.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let locked = libc::mlock(map, 1 << 20) == 0;
            if locked {
                assert!(!drop_file_pages(&path).unwrap());
            }
            libc::munmap(map, 1 << 20);
        }
        assert!(drop_file_pages(&path.with_extension("missing")).is_err());
    }

    const SMAPS: &str = "\
55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
KernelPageSize:        4 kB
Rss:                   8 kB
AnonHugePages:         0 kB
7f0000000000-7f0000800000 rw-p 00000000 00:00 0 
Size:               8192 kB
KernelPageSize:       16 kB
Rss:                8192 kB
AnonHugePages:      2048 kB
FilePmdMapped:         0 kB
7f0000800000-7f0000900000 r--s 00000000 08:01 1234                       /tmp/x (deleted)
KernelPageSize:        4 kB
Rss:                1024 kB
";

    #[test]
    fn smaps_entry_of_an_address_gives_page_size_and_huge_share() {
        let state = parse_smaps_entry(SMAPS, 0x7f00_0000_1000).unwrap();
        assert_eq!(state.page_kib, 16);
        assert!((state.huge_share - 0.25).abs() < 1e-12);
        assert_eq!(state.to_string(), "16k+thp25%");
        let last = parse_smaps_entry(SMAPS, 0x7f00_0080_0000).unwrap();
        assert_eq!(last.to_string(), "4k");
        assert!(parse_smaps_entry(SMAPS, 0x1000).is_none());
    }

    #[test]
    fn mapped_staging_holds_the_same_bytes_and_leaves_no_file() {
        let dir = std::env::temp_dir().join(format!("qb-staging-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = llm_like_weights(16, 256, 3);
        let q = quantize(GgmlType::Q4_0, 16, 256, &w).unwrap();
        let expected = q.raw().to_vec();
        let staged = StagedMatrix::stage(q, LoadMode::Mmap, &dir).unwrap();
        assert_eq!(staged.raw(), &expected[..]);
        assert_eq!(staged.load_mode(), LoadMode::Mmap);
        let state = PageState::of_address(staged.raw().as_ptr() as usize).unwrap();
        assert!(state.page_kib >= 4, "{state}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(staged);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn a_staged_file_opens_in_another_placement_with_the_same_bytes_and_a_wrong_size_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let w = llm_like_weights(16, 256, 3);
        let q = quantize(GgmlType::Q4K, 16, 256, &w).unwrap();
        let path = dir.path().join("w.bin");
        StagedMatrix::write_file(&q, &path).unwrap();
        for mode in [LoadMode::Mmap, LoadMode::NoMmap] {
            let staged = StagedMatrix::open(&path, GgmlType::Q4K, 16, 256, mode).unwrap();
            assert_eq!(staged.raw(), q.raw());
            assert_eq!(staged.load_mode(), mode);
        }
        let err = StagedMatrix::open(&path, GgmlType::Q4K, 32, 256, LoadMode::Mmap)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("w.bin") && err.contains("holds"), "{err}");
    }

    #[test]
    fn staging_in_a_missing_directory_says_where() {
        let q = quantize(GgmlType::Q8_0, 2, 32, &[0.5; 64]).unwrap();
        let missing = Path::new("/nonexistent/quantbench-staging");
        let err = StagedMatrix::stage(q, LoadMode::Mmap, missing)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/quantbench-staging"), "{err}");
    }
}
