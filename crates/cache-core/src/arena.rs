//! Per-shard entry storage: every entry is one **chunk** in fixed-size pages carved into size
//! classes (memcached's slab classes). The chunk *is* the entry — its LRU links, version,
//! expiry and lengths in a 24-byte header, then the key and the value — so a small entry
//! costs no allocation of its own, no allocator header, no refcount and no separate slot.
//!
//! - Every page is [`PAGE_SIZE`] bytes and belongs to one class while it is in use; a class of
//!   chunk size `s` fits `PAGE_SIZE / s` chunks in a page. Freed pages are reused by any class.
//! - A chunk handle is a `u32`: the page number times 512 plus the chunk number in the page.
//!   The shard's index, its LRU links and SIEVE's hand all hold handles.
//! - Header (little-endian): `prev: u32`, `next: u32`, `version: u64`, `meta: u64`. The
//!   arena only knows that `meta == 0` marks a free chunk (the shard's encoding never
//!   produces 0 for an entry; see `shard.rs`).
//! - Memory comes back without giving up exact LRU order: evictions free chunks in whatever
//!   class the victim had, and once a class holds one and a half pages' worth of free chunks
//!   the arena empties its least-used page into the free chunks of its other pages and gives
//!   the page up. Moving a chunk changes its handle, so the shard moves chunks one at a time
//!   ([`Arena::free`] returns a [`Release`], [`Arena::move_one`] moves the next live chunk)
//!   and repoints the chunk's neighbours, the index and its own cursors after each move. So
//!   each class holds less than two and a half pages more than its live chunks need, and
//!   giving a page back costs one page of copying. The half page of hysteresis keeps a class
//!   that alternates allocs and frees at the threshold from giving a page up and taking one
//!   again every time.
//!
//! Known cost: choosing the page to give back walks the shard's page table (O(pages), under
//! the shard lock), once per half page of frees in a class. At 8 KiB pages that is ~16 000
//! pages for a 128 MiB shard; a per-class list ordered by live count would make it O(1) if
//! a profile ever shows it.

/// Bytes in every page.
pub(crate) const PAGE_SIZE: usize = 8192;

/// Bytes at the start of each chunk: `prev`, `next` (`u32` each), `version`, `meta` (`u64`
/// each).
pub(crate) const HEADER_BYTES: usize = 24;

/// Chunk sizes: 8-byte steps up to 128 (small keys and values waste at most 7 bytes), then
/// quarter-power-of-two steps up to 1 KiB (at most 25 % waste). An entry that needs more than
/// the largest chunk keeps its bytes in a `Bytes` of its own and a small chunk for its header.
const CLASS_SIZES: [u16; 27] = [
    16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 160, 192, 224, 256, 320, 384,
    448, 512, 640, 768, 896, 1024,
];

/// Number of size classes.
pub(crate) const CLASSES: usize = CLASS_SIZES.len();

/// The largest chunk, header included.
pub(crate) const MAX_CHUNK: usize = CLASS_SIZES[CLASSES - 1] as usize;

/// Chunk number bits in a handle: up to 512 chunks per page (`PAGE_SIZE / 16`).
const CHUNK_BITS: u32 = 9;

/// Most pages a shard can address with a `u32` handle below `u32::MAX` (64 GiB of pages per
/// shard; `u32::MAX` itself is the shard's "no link").
const MAX_PAGES: usize = (1 << (32 - CHUNK_BITS)) - 1;

/// Released pages kept for reuse instead of going back to the allocator.
const SPARE_PAGES: usize = 2;

/// The class whose chunks hold `len` bytes (header included), or `None` if none is that big.
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

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

const PREV: usize = 0;
const NEXT: usize = 4;
const VERSION: usize = 8;
const META: usize = 16;

/// A page: its bytes and, while in use, its class and live chunk count.
struct Page {
    /// `PAGE_SIZE` bytes; empty while the page number is unused.
    buf: Box<[u8]>,
    class: u8,
    live: u16,
}

/// A page being given up: its live chunks still have to move ([`Arena::move_one`]).
#[derive(Debug)]
pub(crate) struct Release {
    page: usize,
    class: u8,
    /// The next chunk number to look at.
    at: usize,
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
    /// shard's page numbers are exhausted (64 GiB of pages). Its `meta` is 0 until the shard
    /// writes the header.
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
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
        // Every chunk starts free (`meta == 0`), whatever the page held before.
        let size = class_size(class);
        for i in 0..per_page(class) {
            buf[i * size + META..i * size + META + 8].fill(0);
        }
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

    /// The class of the page holding chunk `h`.
    pub(crate) fn class_of(&self, h: u32) -> u8 {
        self.pages[split(h).0].class
    }

    fn chunk(&self, h: u32) -> &[u8] {
        let (page, i) = split(h);
        let p = &self.pages[page];
        let size = class_size(p.class);
        &p.buf[i * size..(i + 1) * size]
    }

    fn chunk_mut(&mut self, h: u32) -> &mut [u8] {
        let (page, i) = split(h);
        let p = &mut self.pages[page];
        let size = class_size(p.class);
        &mut p.buf[i * size..(i + 1) * size]
    }

    pub(crate) fn prev(&self, h: u32) -> u32 {
        read_u32(self.chunk(h), PREV)
    }

    pub(crate) fn next(&self, h: u32) -> u32 {
        read_u32(self.chunk(h), NEXT)
    }

    pub(crate) fn version(&self, h: u32) -> u64 {
        read_u64(self.chunk(h), VERSION)
    }

    pub(crate) fn meta(&self, h: u32) -> u64 {
        read_u64(self.chunk(h), META)
    }

    pub(crate) fn set_prev(&mut self, h: u32, v: u32) {
        self.chunk_mut(h)[PREV..PREV + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn set_next(&mut self, h: u32, v: u32) {
        self.chunk_mut(h)[NEXT..NEXT + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn set_version(&mut self, h: u32, v: u64) {
        self.chunk_mut(h)[VERSION..VERSION + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes `meta`; it must not be 0 (that marks a free chunk).
    pub(crate) fn set_meta(&mut self, h: u32, v: u64) {
        debug_assert_ne!(v, 0, "meta 0 marks a free chunk");
        self.chunk_mut(h)[META..META + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// The chunk's bytes after the header (data and the class's rounding).
    pub(crate) fn data(&self, h: u32) -> &[u8] {
        &self.chunk(h)[HEADER_BYTES..]
    }

    /// Writes `parts` one after the other after the header; they must fit.
    pub(crate) fn write_data(&mut self, h: u32, parts: &[&[u8]]) {
        let chunk = self.chunk_mut(h);
        let mut at = HEADER_BYTES;
        for part in parts {
            chunk[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }

    /// Frees chunk `h` (its `meta` becomes 0). If its class now holds 1.5 pages' worth of free
    /// chunks, starts giving its least-used page up: the caller moves that page's live chunks
    /// with [`Arena::move_one`] until it returns `None`.
    pub(crate) fn free(&mut self, h: u32) -> Option<Release> {
        let class = self.class_of(h);
        self.chunk_mut(h)[META..META + 8].fill(0);
        let c = usize::from(class);
        self.pages[split(h).0].live -= 1;
        self.free[c].push(h);
        if self.free[c].len() < release_threshold(class) {
            return None;
        }
        let victim = (0..self.pages.len())
            .filter(|&p| !self.pages[p].buf.is_empty() && self.pages[p].class == class)
            .min_by_key(|&p| self.pages[p].live)?;
        // Its free chunks leave the free list, so nothing moves into it.
        self.free[c].retain(|&h| split(h).0 != victim);
        Some(Release {
            page: victim,
            class,
            at: 0,
        })
    }

    /// Moves the next live chunk of the page being given up into a free chunk of another
    /// page and returns `(from, to)`; when none is left, gives the page up and returns `None`.
    pub(crate) fn move_one(&mut self, rel: &mut Release) -> Option<(u32, u32)> {
        let size = class_size(rel.class);
        let n = per_page(rel.class);
        while rel.at < n {
            let i = rel.at;
            rel.at += 1;
            let from = handle(rel.page, i);
            if self.meta(from) == 0 {
                continue;
            }
            // Enough free chunks are left on other pages: the trigger was more than a page's
            // worth, and the victim held at most `n - live` of them.
            let Some(to) = self.free[usize::from(rel.class)].pop() else {
                unreachable!("class {}: no free chunk to move a live one into", rel.class);
            };
            let mut tmp = [0u8; MAX_CHUNK];
            tmp[..size].copy_from_slice(self.chunk(from));
            self.chunk_mut(to).copy_from_slice(&tmp[..size]);
            self.pages[split(to).0].live += 1;
            return Some((from, to));
        }
        let buf = std::mem::take(&mut self.pages[rel.page].buf);
        self.pages[rel.page].live = 0;
        if self.spare.len() < SPARE_PAGES {
            self.spare.push(buf);
        }
        self.unused.push(rel.page as u32);
        None
    }

    /// One past the highest chunk position (`page << CHUNK_BITS | chunk`) there can be.
    pub(crate) fn positions(&self) -> usize {
        self.pages.len() << CHUNK_BITS
    }

    /// The live chunk at position `pos`, if there is one; else where to look next (the next
    /// chunk of the page, or the start of the next page once past its last chunk).
    pub(crate) fn live_at(&self, pos: usize) -> Result<u32, usize> {
        let (page, i) = (pos >> CHUNK_BITS, pos & ((1 << CHUNK_BITS) - 1));
        let Some(p) = self.pages.get(page) else {
            return Err(self.positions());
        };
        if p.buf.is_empty() || i >= per_page(p.class) {
            return Err((page + 1) << CHUNK_BITS);
        }
        let h = handle(page, i);
        if self.meta(h) == 0 {
            Err(pos + 1)
        } else {
            Ok(h)
        }
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

    /// Checks the arena's own invariants against the chunks the shard says hold its entries;
    /// `Err` names the first one broken.
    pub(crate) fn validate(&self, used: &[u32]) -> Result<(), String> {
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
        for &h in used {
            let (page, i) = split(h);
            let p = self
                .pages
                .get(page)
                .ok_or(format!("chunk {h:#x}: no page {page}"))?;
            if p.buf.is_empty() || i >= per_page(p.class) {
                return Err(format!("chunk {h:#x} is not in a page in use"));
            }
            if self.meta(h) == 0 {
                return Err(format!("chunk {h:#x} holds an entry but is marked free"));
            }
            if !mark(h) {
                return Err(format!("chunk {h:#x} is used twice"));
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
                if self.meta(h) != 0 {
                    return Err(format!("free chunk {h:#x} is not marked free"));
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
            if p.buf.is_empty() {
                continue;
            }
            if usize::from(p.live) != live[page] {
                return Err(format!(
                    "page {page}: live {} but {} used",
                    p.live, live[page]
                ));
            }
            for i in 0..per_page(p.class) {
                if seen[page][i / 64] & (1 << (i % 64)) == 0 {
                    return Err(format!(
                        "chunk {:#x} is neither used nor free",
                        handle(page, i)
                    ));
                }
                if self.meta(handle(page, i)) != 0 && live[page] == 0 {
                    return Err(format!(
                        "chunk {:#x}: live on an empty page",
                        handle(page, i)
                    ));
                }
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
        let class = class_for(HEADER_BYTES + 64).expect("class");
        // owner -> handle; the owner number is the chunk's version.
        let mut at: Vec<Option<u32>> = Vec::new();
        for owner in 0..2_000u32 {
            let h = arena.alloc(class).expect("alloc");
            arena.set_version(h, u64::from(owner));
            arena.set_meta(h, 1);
            arena.write_data(h, &[&owner.to_le_bytes(), &[owner as u8; 60]]);
            at.push(Some(h));
        }
        let full = arena.footprint();
        for owner in (0..2_000u32).filter(|o| o % 7 != 0) {
            let h = at[owner as usize].take().expect("live");
            if let Some(mut rel) = arena.free(h) {
                while let Some((from, to)) = arena.move_one(&mut rel) {
                    let o = arena.version(to) as usize;
                    assert_eq!(at[o], Some(from));
                    at[o] = Some(to);
                }
            }
            let used: Vec<u32> = at.iter().flatten().copied().collect();
            arena.validate(&used).expect("valid");
        }
        for (owner, h) in at.iter().enumerate() {
            if let Some(h) = *h {
                assert_eq!(arena.version(h), owner as u64);
                let data = arena.data(h);
                assert_eq!(&data[..4], &(owner as u32).to_le_bytes());
                assert_eq!(&data[4..64], &[owner as u8; 60][..]);
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
