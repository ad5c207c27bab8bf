//! Typed access to the pinned classifier maps, in terms of [`Prefix`] tables.

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues},
    Pod,
};
use dots_common::{
    Bucket, Ipv4Key, Ipv6Key, SlotConfig, SlotCounters, SlotMask, Source4Key, Source6Key,
    SourceEntry,
};

use super::{plan::Prefix, EnforceError};

/// How a map key encodes a right-aligned prefix value.
pub(super) trait Codec {
    type K: Pod;
    fn encode(bits: u128) -> Self::K;
    fn decode(k: &Self::K) -> u128;
}

pub(super) struct V4;
pub(super) struct V6;
impl Codec for V4 {
    type K = Ipv4Key;
    fn encode(bits: u128) -> Ipv4Key {
        Ipv4Key::new((bits as u32).to_be_bytes())
    }
    fn decode(k: &Ipv4Key) -> u128 {
        u128::from(u32::from_be_bytes(k.addr))
    }
}

impl Codec for V6 {
    type K = Ipv6Key;
    fn encode(bits: u128) -> Ipv6Key {
        Ipv6Key {
            addr: bits.to_be_bytes(),
        }
    }
    fn decode(k: &Ipv6Key) -> u128 {
        u128::from_be_bytes(k.addr)
    }
}

/// A table of prefixes to values held in a kernel map.
pub(super) trait PrefixMap<V> {
    fn name(&self) -> &'static str;
    fn capacity(&self) -> u32;
    fn read(&self) -> Result<std::collections::HashMap<Prefix, V>, EnforceError>;
    fn upsert(&mut self, p: Prefix, v: V) -> Result<(), EnforceError>;
    fn delete(&mut self, p: Prefix) -> Result<(), EnforceError>;
}

/// An LPM trie keyed by `C`.
pub(super) struct Lpm<C: Codec, V: Pod> {
    pub name: &'static str,
    pub capacity: u32,
    pub map: LpmTrie<MapData, C::K, V>,
}

impl<C: Codec, V: Pod> PrefixMap<V> for Lpm<C, V> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> u32 {
        self.capacity
    }
    fn read(&self) -> Result<std::collections::HashMap<Prefix, V>, EnforceError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    let p = Prefix {
                        bits: C::decode(&k.data()),
                        len: k.prefix_len() as u8,
                    };
                    (p, v)
                })
                .map_err(EnforceError::map(self.name))
            })
            .collect()
    }
    fn upsert(&mut self, p: Prefix, v: V) -> Result<(), EnforceError> {
        let key = Key::new(u32::from(p.len), C::encode(p.bits));
        self.map
            .insert(&key, v, 0)
            .map_err(EnforceError::map(self.name))
    }
    fn delete(&mut self, p: Prefix) -> Result<(), EnforceError> {
        let key = Key::new(u32::from(p.len), C::encode(p.bits));
        ignore_missing(self.map.remove(&key)).map_err(EnforceError::map(self.name))
    }
}

/// How a source hash key encodes a prefix (address masked, and length).
pub(super) trait SourceCodec {
    type K: Pod;
    fn encode(p: Prefix) -> Self::K;
    fn decode(k: &Self::K) -> Prefix;
}

impl SourceCodec for V4 {
    type K = Source4Key;
    fn encode(p: Prefix) -> Source4Key {
        Source4Key {
            addr: (p.bits as u32).to_be_bytes(),
            prefix_len: u32::from(p.len),
        }
    }
    fn decode(k: &Source4Key) -> Prefix {
        Prefix {
            bits: u128::from(u32::from_be_bytes(k.addr)),
            len: k.prefix_len as u8,
        }
    }
}

impl SourceCodec for V6 {
    type K = Source6Key;
    fn encode(p: Prefix) -> Source6Key {
        Source6Key {
            addr: p.bits.to_be_bytes(),
            prefix_len: u32::from(p.len),
        }
    }
    fn decode(k: &Source6Key) -> Prefix {
        Prefix {
            bits: u128::from_be_bytes(k.addr),
            len: k.prefix_len as u8,
        }
    }
}

/// The hash of every source prefix of one family.
pub(super) struct SourceHash<C: SourceCodec> {
    pub name: &'static str,
    pub capacity: u32,
    pub map: HashMap<MapData, C::K, SourceEntry>,
}

impl<C: SourceCodec> PrefixMap<SourceEntry> for SourceHash<C> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn capacity(&self) -> u32 {
        self.capacity
    }
    fn read(&self) -> Result<std::collections::HashMap<Prefix, SourceEntry>, EnforceError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| (C::decode(&k), v))
                    .map_err(EnforceError::map(self.name))
            })
            .collect()
    }
    fn upsert(&mut self, p: Prefix, v: SourceEntry) -> Result<(), EnforceError> {
        self.map
            .insert(C::encode(p), v, 0)
            .map_err(EnforceError::map(self.name))
    }
    fn delete(&mut self, p: Prefix) -> Result<(), EnforceError> {
        ignore_missing(self.map.remove(&C::encode(p))).map_err(EnforceError::map(self.name))
    }
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// An array of slot masks indexed by a field's value (protocol, port, ICMP
/// type), created `BPF_F_MMAPABLE` and written through a shared mapping: a
/// port range writes thousands of values, each a store, not a syscall. The
/// program only reads these arrays, and every word is stored whole
/// (aligned 8-byte stores), so a reader sees each word old or new.
///
/// A mapping covers only the pages one read or write needs and lasts as
/// long as it: the two port arrays are 2 MiB each, kernel memory the maps
/// hold anyway, and a lasting mapping of them would count 4 MiB in the
/// agent's resident set.
pub(super) struct SlotArray {
    pub name: &'static str,
    map: MapData,
    len: usize,
}

impl SlotArray {
    /// The `len` slot masks of array `map`; fails if the map cannot be
    /// mapped (not created mmapable, or shorter than `len`).
    pub(super) fn open(
        name: &'static str,
        map: MapData,
        len: usize,
    ) -> Result<SlotArray, EnforceError> {
        let array = SlotArray { name, map, len };
        array.window(0..len)?;
        Ok(array)
    }

    /// Every value.
    pub(super) fn read(&self) -> Result<Vec<SlotMask>, EnforceError> {
        let window = self.window(0..self.len)?;
        Ok((0..self.len).map(|i| window.get(i)).collect())
    }

    /// Writes `values` to the indices from `first` on.
    pub(super) fn write(&mut self, first: usize, values: &[SlotMask]) -> Result<(), EnforceError> {
        let mut window = self.window(first..first + values.len())?;
        for (i, v) in values.iter().enumerate() {
            window.set(first + i, v);
        }
        Ok(())
    }

    /// Writes each `(index, value)`, through one mapping from the lowest
    /// index to the highest.
    pub(super) fn write_each(&mut self, writes: &[(usize, SlotMask)]) -> Result<(), EnforceError> {
        let (Some(lo), Some(hi)) = (
            writes.iter().map(|w| w.0).min(),
            writes.iter().map(|w| w.0).max(),
        ) else {
            return Ok(());
        };
        let mut window = self.window(lo..hi + 1)?;
        for (i, v) in writes {
            window.set(*i, v);
        }
        Ok(())
    }

    /// Maps the pages that hold `indices`.
    fn window(&self, indices: std::ops::Range<usize>) -> Result<Window, EnforceError> {
        use std::os::fd::{AsFd, AsRawFd};
        if indices.start > indices.end || indices.end > self.len {
            return Err(EnforceError::Io {
                action: "mapping",
                path: self.name.into(),
                source: std::io::Error::other(format!(
                    "indices {indices:?} outside the array's {}",
                    self.len
                )),
            });
        }
        const SIZE: usize = std::mem::size_of::<SlotMask>();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let offset = indices.start * SIZE / page * page;
        let bytes = (indices.end * SIZE).div_ceil(page) * page - offset;
        let failed = |source| EnforceError::Io {
            action: "mapping",
            path: self.name.into(),
            source,
        };
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| failed(std::io::Error::other("offset too large")))?;
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks
        // that the map is mmapable and holds `offset + bytes`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes.max(page),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.map.fd().as_fd().as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| failed(std::io::Error::other("mmap returned null")))?;
        Ok(Window {
            ptr,
            bytes: bytes.max(page),
            first: offset / SIZE,
            indices,
        })
    }
}

/// A mapping of some pages of a [`SlotArray`], unmapped when dropped.
struct Window {
    ptr: std::ptr::NonNull<u8>,
    bytes: usize,
    /// The array index at the mapping's first byte.
    first: usize,
    /// The indices this window may touch.
    indices: std::ops::Range<usize>,
}

impl Window {
    fn slot(&self, i: usize) -> *mut u64 {
        assert!(
            self.indices.contains(&i),
            "index {i} outside {:?}",
            self.indices
        );
        // SAFETY: `i` is within the mapped indices (checked above), so the
        // offset stays inside the mapping.
        unsafe {
            self.ptr
                .as_ptr()
                .add((i - self.first) * std::mem::size_of::<SlotMask>())
                .cast::<u64>()
        }
    }

    fn get(&self, i: usize) -> SlotMask {
        let words = self.slot(i);
        let mut m = SlotMask::EMPTY;
        for (w, bits) in m.bits.iter_mut().enumerate() {
            // SAFETY: an aligned word of a live mapping (pages are aligned,
            // a mask is four words).
            *bits = unsafe { std::ptr::read_volatile(words.add(w)) };
        }
        m
    }

    fn set(&mut self, i: usize, m: &SlotMask) {
        let words = self.slot(i);
        for (w, bits) in m.bits.iter().enumerate() {
            // SAFETY: as in `get`; each word is stored whole.
            unsafe { std::ptr::write_volatile(words.add(w), *bits) };
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `SlotArray::window`,
        // used no more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// One value per slot in a plain array (`DOTS_SLOTS`, `DOTS_BUCKETS`).
pub(super) struct PerSlot<V: Pod> {
    pub name: &'static str,
    pub map: Array<MapData, V>,
}

impl<V: Pod> PerSlot<V> {
    pub(super) fn get(&self, slot: u16) -> Result<V, EnforceError> {
        self.map
            .get(&u32::from(slot), 0)
            .map_err(EnforceError::map(self.name))
    }

    pub(super) fn set(&mut self, slot: u16, value: V) -> Result<(), EnforceError> {
        self.map
            .set(u32::from(slot), value, 0)
            .map_err(EnforceError::map(self.name))
    }
}

/// The slot configurations (expiry, action).
pub(super) type SlotConfigs = PerSlot<SlotConfig>;
/// The rate limits' buckets.
pub(super) type Buckets = PerSlot<Bucket>;

/// Per-CPU values summed, and reset.
pub(super) struct PerCpu<V: Pod> {
    pub name: &'static str,
    pub map: PerCpuArray<MapData, V>,
}

impl PerCpu<SlotCounters> {
    pub(super) fn total(&self, index: u32) -> Result<SlotCounters, EnforceError> {
        let values = self
            .map
            .get(&index, 0)
            .map_err(EnforceError::map(self.name))?;
        Ok(values.iter().fold(SlotCounters::default(), |acc, c| {
            crate::enforce::counters::sum(&acc, c)
        }))
    }
}

impl PerCpu<u64> {
    pub(super) fn total(&self, index: u32) -> Result<u64, EnforceError> {
        let values = self
            .map
            .get(&index, 0)
            .map_err(EnforceError::map(self.name))?;
        Ok(values.iter().sum())
    }
}

impl<V: Pod + Default + Clone> PerCpu<V> {
    pub(super) fn reset(&mut self, index: u32) -> Result<(), EnforceError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| EnforceError::Io {
            action: "counting CPUs from",
            path: what.into(),
            source,
        })?;
        let zeros = PerCpuValues::try_from(vec![V::default(); cpus]).map_err(|source| {
            EnforceError::Io {
                action: "building per-CPU zeros for",
                path: self.name.into(),
                source,
            }
        })?;
        self.map
            .set(index, zeros, 0)
            .map_err(EnforceError::map(self.name))
    }
}
