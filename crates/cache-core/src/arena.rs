//! Per-shard storage for small entries: the key and value bytes live inline in fixed-size
//! pages carved into size-class chunks (memcached's slab classes), so a small entry costs no
//! allocation of its own, no allocator header and no refcount.
//!
//! - Every page is [`PAGE_SIZE`] bytes and belongs to one class while it is in use; a class of
//!   chunk size `s` fits `PAGE_SIZE / s` chunks in a page. Freed pages are reused by any class.
//! - A chunk starts with an 8-byte header — its owner, the shard slot number holding the entry
//!   (4 bytes), the key's length and the value's (2 bytes each) — then the key and the value.
//!   The owner lets the arena move a chunk and tell the shard where it went; the lengths live
//!   here rather than in the slot, which keeps the slot at 32 bytes.
//! - Memory comes back without giving up exact LRU order: evictions free chunks in whatever
//!   class the victim had, and once a class holds one and a half pages' worth of free chunks
//!   the arena empties its least-used page into the free chunks of its other pages
//!   ([`Arena::free`] calls back with every move) and gives the page up. So each class holds
//!   less than two and a half pages more than its live chunks need (one partly used page, and
//!   free chunks short of the threshold), and giving a page back costs one page of copying.
//!   The half page of hysteresis keeps a class that alternates allocs and frees at the
//!   threshold from giving a page up and taking one again every time.
//!
//! A chunk handle is a `u32`: the page number times 512 plus the chunk number in the page.
//!
//! Known cost: choosing the page to give back walks the shard's page table (O(pages), under
//! the shard lock), once per half page of frees in a class. At 8 KiB pages that is ~16 000
//! pages for a 128 MiB shard; a per-class list ordered by live count would make it O(1) if
//! a profile ever shows it.

/// Bytes in every page.
pub(crate) const PAGE_SIZE: usize = 8192;

/// Bytes at the start of each chunk: the owning slot (`u32`), the key's and the value's
/// lengths (`u16` each; a chunk is at most 1 KiB).
pub(crate) const HEADER_BYTES: usize = 8;

/// Bytes of the owner field, the first of the header.
const OWNER_BYTES: usize = 4;

/// Chunk sizes: 8-byte steps up to 128 (small keys and values waste at most 7 bytes), then
/// quarter-power-of-two steps up to 1 KiB (at most 25 % waste). An entry that needs more than
/// the largest chunk is stored as its own `Bytes` by the shard.
const CLASS_SIZES: [u16; 27] = [
    16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 160, 192, 224, 256, 320, 384,
    448, 512, 640, 768, 896, 1024,
];

/// Number of size classes.
pub(crate) const CLASSES: usize = CLASS_SIZES.len();

/// The largest chunk, owner bytes included.
pub(crate) const MAX_CHUNK: usize = CLASS_SIZES[CLASSES - 1] as usize;

/// Chunk number bits in a handle: up to 512 chunks per page (`PAGE_SIZE / 16`).
const CHUNK_BITS: u32 = 9;

/// Most pages a shard can address with a `u32` handle (64 GiB of pages per shard).
const MAX_PAGES: usize = 1 << (32 - CHUNK_BITS);

/// Released pages kept for reuse instead of going back to the allocator.
const SPARE_PAGES: usize = 2;

/// The class whose chunks hold `len` bytes (owner included), or `None` if none is that big.
pub(crate) fn class_for(len: usize) -> Option<u8> {
    if len <= 128 {
        return Some((len.max(16).div_ceil(8) - 2) as u8);
    }
    CLASS_SIZES
        .iter()
        .position(|&s| usize::from(s) >= len)
        .map(|c| c as u8)
}

/// Chunk size of `class`.
pub(crate) fn class_size(class: u8) -> usize {
    usize::from(CLASS_SIZES[usize::from(class)])
}

fn per_page(class: u8) -> usize {
    PAGE_SIZE / class_size(class)
}

/// Free chunks at which a class gives a page back: a page and a half.
fn release_threshold(class: u8) -> usize {
    per_page(class) + per_page(class) / 2
}

fn handle(page: usize, chunk: usize) -> u32 {
    ((page << CHUNK_BITS) | chunk) as u32
}

fn split(h: u32) -> (usize, usize) {
    (
        (h >> CHUNK_BITS) as usize,
        (h & ((1 << CHUNK_BITS) - 1)) as usize,
    )
}

/// A page: its bytes and, while in use, its class and live chunk count.
struct Page {
    /// `PAGE_SIZE` bytes; empty while the page number is unused.
    buf: Box<[u8]>,
    class: u8,
    live: u16,
}

/// The chunk store of one shard. See the module docs.
pub(crate) struct Arena {
    pages: Vec<Page>,
    /// Page numbers whose page was given up, for reuse.
    unused: Vec<u32>,
    /// Given-up page buffers kept for the next page (at most [`SPARE_PAGES`]).
    spare: Vec<Box<[u8]>>,
    /// Free chunk handles per class.
    free: [Vec<u32>; CLASSES],
}

impl Arena {
    pub(crate) fn new() -> Self {
        Self {
            pages: Vec::new(),
            unused: Vec::new(),
            spare: Vec::new(),
            free: std::array::from_fn(|_| Vec::new()),
        }
    }

    /// A free chunk of `class`, taking a new page if the class has none; `None` only when the
    /// shard's page numbers are exhausted (64 GiB of pages).
    pub(crate) fn alloc(&mut self, class: u8) -> Option<u32> {
        let c = usize::from(class);
        let h = match self.free[c].pop() {
            Some(h) => h,
            None => {
                let page = self.new_page(class)?;
                let n = per_page(class);
                // Hand chunks out in address order: chunk 0 now, then 1, 2, ...
                self.free[c].extend((1..n).rev().map(|i| handle(page, i)));
                handle(page, 0)
            }
        };
        self.pages[split(h).0].live += 1;
        Some(h)
    }

    fn new_page(&mut self, class: u8) -> Option<usize> {
        let buf = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
        let page = Page {
            buf,
            class,
            live: 0,
        };
        let id = match self.unused.pop() {
            Some(id) => {
                self.pages[id as usize] = page;
                id as usize
            }
            None if self.pages.len() < MAX_PAGES => {
                self.pages.push(page);
                self.pages.len() - 1
            }
            None => return None,
        };
        Some(id)
    }

    /// The whole chunk `h` of `class` (owner, key, value and the class's rounding).
    pub(crate) fn chunk(&self, h: u32, class: u8) -> &[u8] {
        let (page, i) = split(h);
        let size = class_size(class);
        &self.pages[page].buf[i * size..(i + 1) * size]
    }

    /// Writes the header (`owner` and the lengths), `key` and `value` into chunk `h` of
    /// `class`, which must hold [`HEADER_BYTES`] + both.
    pub(crate) fn fill(&mut self, h: u32, class: u8, owner: u32, key: &[u8], value: &[u8]) {
        let (page, i) = split(h);
        let size = class_size(class);
        let chunk = &mut self.pages[page].buf[i * size..(i + 1) * size];
        chunk[..OWNER_BYTES].copy_from_slice(&owner.to_le_bytes());
        chunk[4..6].copy_from_slice(&(key.len() as u16).to_le_bytes());
        chunk[6..8].copy_from_slice(&(value.len() as u16).to_le_bytes());
        let k = HEADER_BYTES + key.len();
        chunk[HEADER_BYTES..k].copy_from_slice(key);
        chunk[k..k + value.len()].copy_from_slice(value);
    }

    /// The key and the value stored in chunk `h` of `class`.
    pub(crate) fn entry(&self, h: u32, class: u8) -> (&[u8], &[u8]) {
        let chunk = self.chunk(h, class);
        let k = usize::from(u16::from_le_bytes([chunk[4], chunk[5]]));
        let v = usize::from(u16::from_le_bytes([chunk[6], chunk[7]]));
        let (key, rest) = chunk[HEADER_BYTES..].split_at(k);
        (key, &rest[..v])
    }

    /// The slot that owns chunk `h` of `class`.
    pub(crate) fn owner(&self, h: u32, class: u8) -> u32 {
        let chunk = self.chunk(h, class);
        u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])
    }

    /// Frees chunk `h` of `class`. If the class now holds 1.5 pages' worth of free chunks,
    /// empties its least-used page into its other free chunks and gives the page up; every
    /// chunk moved is reported as `moved(owner, new_handle)` so the shard can follow it.
    pub(crate) fn free(&mut self, h: u32, class: u8, moved: impl FnMut(u32, u32)) {
        let c = usize::from(class);
        self.pages[split(h).0].live -= 1;
        self.free[c].push(h);
        if self.free[c].len() >= release_threshold(class) {
            self.release_page(class, moved);
        }
    }

    fn release_page(&mut self, class: u8, mut moved: impl FnMut(u32, u32)) {
        let c = usize::from(class);
        let size = class_size(class);
        let n = per_page(class);
        let Some(victim) = (0..self.pages.len())
            .filter(|&p| !self.pages[p].buf.is_empty() && self.pages[p].class == class)
            .min_by_key(|&p| self.pages[p].live)
        else {
            return;
        };
        // Its free chunks leave the free list; what is not free on it is live.
        let mut is_free = [false; PAGE_SIZE / 16];
        self.free[c].retain(|&h| {
            let (page, i) = split(h);
            if page == victim {
                is_free[i] = true;
                false
            } else {
                true
            }
        });
        let mut tmp = [0u8; MAX_CHUNK];
        for i in (0..n).filter(|&i| !is_free[i]) {
            // Enough free chunks are left on other pages: the trigger was more than a page's
            // worth, and the victim held at most `n - live` of them.
            let Some(to) = self.free[c].pop() else {
                unreachable!("class {class}: no free chunk to move a live one into");
            };
            tmp[..size].copy_from_slice(&self.pages[victim].buf[i * size..(i + 1) * size]);
            let (page, j) = split(to);
            self.pages[page].buf[j * size..(j + 1) * size].copy_from_slice(&tmp[..size]);
            self.pages[page].live += 1;
            let owner = u32::from_le_bytes(tmp[..OWNER_BYTES].try_into().expect("4 bytes"));
            moved(owner, to);
        }
        let buf = std::mem::take(&mut self.pages[victim].buf);
        self.pages[victim].live = 0;
        if self.spare.len() < SPARE_PAGES {
            self.spare.push(buf);
        }
        self.unused.push(victim as u32);
    }

    /// Bytes the arena holds: pages in use and spare pages, its tables included.
    pub(crate) fn footprint(&self) -> usize {
        let pages = self.pages.len() - self.unused.len() + self.spare.len();
        pages * PAGE_SIZE
            + self.pages.capacity() * std::mem::size_of::<Page>()
            + self.free.iter().map(|f| f.capacity() * 4).sum::<usize>()
    }

    /// Drops every page.
    pub(crate) fn clear(&mut self) {
        *self = Self::new();
    }

    /// Checks the arena's own invariants against the chunks the shard says are in use
    /// (`(handle, class)` per entry); `Err` names the first one broken.
    pub(crate) fn validate(&self, used: &[(u32, u8)]) -> Result<(), String> {
        let mut live = vec![0usize; self.pages.len()];
        // One bit per chunk of every page: set when the chunk is accounted for.
        let mut seen = vec![[0u64; (PAGE_SIZE / 16) / 64]; self.pages.len()];
        let mut mark = |h: u32| {
            let (page, i) = split(h);
            let word = &mut seen[page][i / 64];
            let fresh = *word & (1 << (i % 64)) == 0;
            *word |= 1 << (i % 64);
            fresh
        };
        for &(h, class) in used.iter() {
            let (page, i) = split(h);
            let p = self
                .pages
                .get(page)
                .ok_or(format!("chunk {h:#x}: no page {page}"))?;
            if p.buf.is_empty() || p.class != class || i >= per_page(class) {
                return Err(format!(
                    "chunk {h:#x} of class {class} is not in a page of it"
                ));
            }
            if !mark(h) {
                return Err(format!("chunk {h:#x} is used twice"));
            }
            let chunk = self.chunk(h, class);
            let k = usize::from(u16::from_le_bytes([chunk[4], chunk[5]]));
            let v = usize::from(u16::from_le_bytes([chunk[6], chunk[7]]));
            if HEADER_BYTES + k + v > chunk.len() {
                return Err(format!("chunk {h:#x}: key and value beyond it"));
            }
            live[page] += 1;
        }
        for (c, free) in self.free.iter().enumerate() {
            for &h in free {
                let (page, i) = split(h);
                let p = &self.pages[page];
                if p.buf.is_empty() || usize::from(p.class) != c || i >= per_page(c as u8) {
                    return Err(format!("free chunk {h:#x} is not in a page of class {c}"));
                }
                if !mark(h) {
                    return Err(format!("chunk {h:#x} is both free and used, or free twice"));
                }
            }
            if free.len() >= release_threshold(c as u8) {
                return Err(format!("class {c} holds {} free chunks", free.len()));
            }
        }
        for (page, p) in self.pages.iter().enumerate() {
            if !p.buf.is_empty() && usize::from(p.live) != live[page] {
                return Err(format!(
                    "page {page}: live {} but {} used",
                    p.live, live[page]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_length_with_bounded_waste() {
        for len in 1..=MAX_CHUNK {
            let c = class_for(len).expect("a class");
            let size = class_size(c);
            assert!(size >= len, "{len} in {size}");
            assert!(
                size <= 16 || size - len < 8 || size * 4 <= len * 5,
                "{len} in {size}"
            );
            assert!(
                c == 0 || class_size(c - 1) < len,
                "{len}: a smaller class fits"
            );
        }
        assert_eq!(class_for(MAX_CHUNK + 1), None);
        assert!(PAGE_SIZE / class_size(0) <= 1 << CHUNK_BITS);
    }

    /// Fill a class, free most of it in a scattered order: pages are given up, every moved
    /// chunk keeps its bytes, and the arena stays within two pages of what is live.
    #[test]
    fn freeing_gives_pages_back_and_moves_live_chunks_intact() {
        let mut arena = Arena::new();
        let class = class_for(100).expect("class");
        // owner -> handle
        let mut at: Vec<Option<u32>> = Vec::new();
        for owner in 0..2_000u32 {
            let h = arena.alloc(class).expect("alloc");
            arena.fill(h, class, owner, &owner.to_le_bytes(), &[owner as u8; 60]);
            assert_eq!(arena.owner(h, class), owner);
            at.push(Some(h));
        }
        let full = arena.footprint();
        for owner in (0..2_000u32).filter(|o| o % 7 != 0) {
            let h = at[owner as usize].take().expect("live");
            arena.free(h, class, |o, to| at[o as usize] = Some(to));
            let used: Vec<(u32, u8)> = at.iter().flatten().map(|&h| (h, class)).collect();
            arena.validate(&used).expect("valid");
        }
        for (owner, h) in at.iter().enumerate() {
            if let Some(h) = *h {
                assert_eq!(arena.owner(h, class), owner as u32);
                let (key, value) = arena.entry(h, class);
                assert_eq!(key, &(owner as u32).to_le_bytes());
                assert_eq!(value, &[owner as u8; 60][..]);
            }
        }
        let live = at.iter().flatten().count();
        let pages_needed = live.div_ceil(per_page(class));
        assert!(
            arena.pages.len() - arena.unused.len() <= pages_needed + 2,
            "{} pages for {live} chunks",
            arena.pages.len() - arena.unused.len()
        );
        assert!(
            arena.footprint() < full / 3,
            "{} of {full}",
            arena.footprint()
        );
    }
}
