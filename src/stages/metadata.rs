//! The input's EXIF, carried to the output (`encode.keep_metadata`) filtered to what is
//! safe to publish.
//!
//! This module owns where each container keeps its EXIF (a JPEG's APP1, which the JPEG
//! decoder hands over; a PNG's `eXIf` and a WebP's `EXIF` chunk, through the `image`
//! crate; a TIFF's own first IFD; a HEIF's `Exif` item, behind a 4-byte offset), what of
//! it survives, and the fresh TIFF structure it is written out as. The decoder calls in
//! here once per image and only when the key is on, so by default nothing is read or
//! allocated; the encoder writes the result as it is.
//!
//! What survives is IFD0 and the Exif IFD (camera make and model, dates, exposure, lens
//! model, and any tag not named below), entry by entry. Each value is copied by its
//! content into a new structure, never patched in place, so nothing dropped can come back
//! through bytes that no entry references any more (a MakerNote's, a thumbnail's).
//! Dropped:
//! - what identifies a person, a place or a camera: the GPS IFD, the MakerNote (opaque
//!   vendor data, serial numbers included), BodySerialNumber, LensSerialNumber,
//!   CameraOwnerName, ImageUniqueID, DNG's CameraSerialNumber, UserComment and its
//!   Windows twin XPComment;
//! - containers inside the EXIF that can repeat all of that (XMP, IPTC, Photoshop
//!   resources, DNG private data);
//! - the thumbnail (IFD1) and the Interoperability IFD;
//! - what describes the input's pixels and no longer the output's: the baseline TIFF
//!   tags of the image's storage (size, strips, tiles, compression, samples, its old
//!   colour description; from that range only the descriptive tags are kept), the pixel
//!   dimensions, the gamma and the embedded profile (the encoder tags its own sRGB one);
//! - any value that is an offset (type IFD, sub-IFDs, padding and offset schemas).
//!
//! Rewritten: Orientation becomes 1 (the decoder applied it: the pixels are upright) and
//! ColorSpace 1, sRGB (the decoder converted them). The byte order is the input's, so
//! values are copied without knowing their meaning.
//!
//! Why no crate: kamadak-exif reads well (the tests use it as the independent reader) but
//! writes only through its `experimental` module, whose API may change in any release,
//! and it parses from an owned `Vec` of the whole input (for a TIFF, its pixels copied to
//! find a few tags). little_exif knows a few dozen tags and rewrites whole files; rexif
//! does not write. What is needed is small: two IFDs read from a slice, one written.
//!
//! Inputs are untrusted: every offset and length is checked against the data, each IFD is
//! read once (the Exif IFD is followed from IFD0 only, so a crafted pointer cannot loop),
//! and the rebuilt EXIF is bounded ([`MAX_EXIF`]): entries that share one value could
//! otherwise multiply a small input many times over.

use std::borrow::Cow;

use image::{ImageDecoder, ImageFormat};

/// The most TIFF bytes a JPEG APP1 segment holds: 65535 for the segment, less its 2-byte
/// length and the `Exif\0\0` header.
pub const MAX_JPEG_EXIF: usize = 65_535 - 2 - EXIF_HEADER.len();

/// The largest EXIF kept, read or written: real ones are a few tens of KiB (a JPEG's must
/// fit in 64 KiB); anything larger is not a camera's.
pub const MAX_EXIF: usize = 1 << 20;

/// What precedes the TIFF structure in a JPEG's APP1 (and, against the specs, in some
/// PNG and WebP files).
pub const EXIF_HEADER: &[u8] = b"Exif\0\0";

/// Tags this module acts on, by number.
mod tag {
    pub const ORIENTATION: u16 = 0x0112;
    pub const EXIF_IFD: u16 = 0x8769;
    pub const COLOR_SPACE: u16 = 0xA001;
    /// From the baseline TIFF range (up to YCbCrPositioning, 0x0213), which describes how
    /// the image is stored, only these describe the photo: DocumentName,
    /// ImageDescription, Make, Model, Orientation, X/YResolution, PageName,
    /// ResolutionUnit, Software, DateTime, Artist, HostComputer.
    pub const BASELINE_END: u16 = 0x0213;
    pub const BASELINE_KEPT: &[u16] = &[
        0x010D, 0x010E, 0x010F, 0x0110, 0x0112, 0x011A, 0x011B, 0x011D, 0x0128, 0x0131, 0x0132,
        0x013B, 0x013C,
    ];
    /// Private: GPS IFD, MakerNote, UserComment, ImageUniqueID, CameraOwnerName,
    /// BodySerialNumber, LensSerialNumber, CameraSerialNumber (DNG), XPComment.
    pub const PRIVATE: &[u16] = &[
        0x8825, 0x927C, 0x9286, 0xA420, 0xA430, 0xA431, 0xA435, 0xC62F, 0x9C9C,
    ];
    /// Containers that can repeat what is private: XMP, IPTC, Photoshop, DNGPrivateData.
    pub const CONTAINERS: &[u16] = &[0x02BC, 0x83BB, 0x8649, 0xC634];
    /// Structure and the input's pixels: the Exif and Interoperability IFD pointers (the
    /// first is rewritten), the ICC profile, PixelX/YDimension, Gamma, Padding and
    /// OffsetSchema (Microsoft's, both about the layout of the old bytes).
    pub const STRUCTURE: &[u16] = &[
        0x8769, 0xA005, 0x8773, 0xA002, 0xA003, 0xA500, 0xEA1C, 0xEA1D,
    ];
}

const SHORT: u16 = 3;
const LONG: u16 = 4;
/// A value of type IFD is an offset to a sub-IFD: never self-contained.
const IFD: u16 = 13;

/// Bytes per unit of a TIFF field type; `None` for types EXIF does not define, whose size
/// is unknown, so their values cannot be copied.
fn unit_size(typ: u16) -> Option<usize> {
    match typ {
        1 | 2 | 6 | 7 => Some(1),
        3 | 8 => Some(2),
        LONG | 9 | 11 | IFD => Some(4),
        5 | 10 | 12 => Some(8),
        _ => None,
    }
}

/// Which IFD an entry came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ifd {
    Primary,
    Exif,
}

/// One IFD entry with its value's bytes (in the structure's byte order), wherever they
/// were stored.
#[derive(Debug, Clone)]
struct Entry<'a> {
    tag: u16,
    typ: u16,
    count: u32,
    value: Cow<'a, [u8]>,
}

impl Entry<'_> {
    fn short(tag: u16, v: u16, le: bool) -> Entry<'static> {
        Entry {
            tag,
            typ: SHORT,
            count: 1,
            value: Cow::Owned(put16(v, le).to_vec()),
        }
    }

    /// The offset a pointer entry holds (one LONG or IFD).
    fn offset(&self, le: bool) -> Option<usize> {
        (matches!(self.typ, LONG | IFD) && self.count == 1).then(|| get32(&self.value, le) as usize)
    }
}

fn get16(b: &[u8], le: bool) -> u16 {
    let b = [b[0], b[1]];
    if le {
        u16::from_le_bytes(b)
    } else {
        u16::from_be_bytes(b)
    }
}

fn get32(b: &[u8], le: bool) -> u32 {
    let b = [b[0], b[1], b[2], b[3]];
    if le {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }
}

fn put16(v: u16, le: bool) -> [u8; 2] {
    if le { v.to_le_bytes() } else { v.to_be_bytes() }
}

fn put32(v: u32, le: bool) -> [u8; 4] {
    if le { v.to_le_bytes() } else { v.to_be_bytes() }
}

/// A TIFF structure being read: the bytes from its header on, and their byte order.
#[derive(Clone, Copy)]
struct Tiff<'a> {
    d: &'a [u8],
    le: bool,
}

impl<'a> Tiff<'a> {
    fn new(d: &'a [u8]) -> Option<Tiff<'a>> {
        let le = match d.get(..4)? {
            b"II\x2a\0" => true,
            b"MM\0\x2a" => false,
            _ => return None,
        };
        Some(Tiff { d, le })
    }

    fn bytes(&self, at: usize, len: usize) -> Option<&'a [u8]> {
        self.d.get(at..at.checked_add(len)?)
    }

    /// The entries of the IFD at `at`. An entry of an unknown type, or whose value lies
    /// outside the data, is skipped: a value that cannot be read is not worth keeping.
    fn ifd(&self, at: usize) -> Option<Vec<Entry<'a>>> {
        let n = get16(self.bytes(at, 2)?, self.le) as usize;
        let table = self.bytes(at + 2, 12 * n)?;
        Some(
            table
                .chunks_exact(12)
                .filter_map(|e| self.entry(e))
                .collect(),
        )
    }

    fn entry(&self, e: &'a [u8]) -> Option<Entry<'a>> {
        let (tag, typ, count) = (
            get16(e, self.le),
            get16(&e[2..], self.le),
            get32(&e[4..], self.le),
        );
        let len = unit_size(typ)?.checked_mul(count as usize)?;
        // Up to four bytes are stored in the entry itself, longer values at an offset.
        let value = if len <= 4 {
            &e[8..8 + len]
        } else {
            self.bytes(get32(&e[8..], self.le) as usize, len)?
        };
        Some(Entry {
            tag,
            typ,
            count,
            value: Cow::Borrowed(value),
        })
    }
}

/// Filter raw EXIF (a TIFF structure, `Exif\0\0` before it or not) into a fresh one that
/// holds only what is safe to publish. `None` when nothing usable is left, the input is
/// not EXIF, or the result would be over [`MAX_EXIF`].
pub fn filter(raw: &[u8]) -> Option<Vec<u8>> {
    let t = Tiff::new(raw.strip_prefix(EXIF_HEADER).unwrap_or(raw))?;
    let at0 = get32(t.bytes(4, 4)?, t.le) as usize;
    let ifd0 = t.ifd(at0)?;
    let exif = ifd0
        .iter()
        .find(|e| e.tag == tag::EXIF_IFD)
        .and_then(|e| e.offset(t.le))
        .filter(|&at| at != at0)
        .and_then(|at| t.ifd(at))
        .unwrap_or_default();
    let ifd0 = kept(Ifd::Primary, ifd0, t.le);
    let exif = kept(Ifd::Exif, exif, t.le);
    if ifd0.is_empty() && exif.is_empty() {
        return None;
    }
    let size = ifd0
        .iter()
        .chain(&exif)
        .map(|e| 12 + e.value.len())
        .fold(64, usize::saturating_add);
    if size > MAX_EXIF {
        tracing::warn!(
            "the input's EXIF would take {size} bytes, over the {MAX_EXIF} kept at most: written without it"
        );
        return None;
    }
    build(t.le, ifd0, exif)
}

/// The entries of one IFD that are kept, rewritten where they must be, sorted by tag (as
/// TIFF requires) and without repeats (the first one is kept).
fn kept<'a>(ifd: Ifd, entries: Vec<Entry<'a>>, le: bool) -> Vec<Entry<'a>> {
    let mut out: Vec<Entry> = entries
        .into_iter()
        .filter(|e| e.typ != IFD && !dropped(e.tag))
        .map(|e| match (ifd, e.tag) {
            (Ifd::Primary, tag::ORIENTATION) => Entry::short(e.tag, 1, le),
            (Ifd::Exif, tag::COLOR_SPACE) => Entry::short(e.tag, 1, le),
            _ => e,
        })
        .collect();
    out.sort_by_key(|e| e.tag);
    out.dedup_by_key(|e| e.tag);
    out
}

/// Whether a tag is dropped (in either IFD: a tag misplaced in the other one is judged the
/// same way).
fn dropped(t: u16) -> bool {
    if t <= tag::BASELINE_END {
        return !tag::BASELINE_KEPT.contains(&t);
    }
    [tag::PRIVATE, tag::CONTAINERS, tag::STRUCTURE]
        .iter()
        .any(|list| list.contains(&t))
}

/// The new TIFF structure: header, IFD0 (with a pointer to the Exif IFD when there is
/// one) and its values, then the Exif IFD and its values; no IFD1. `None` when an IFD
/// has more entries than TIFF can count.
fn build(le: bool, mut ifd0: Vec<Entry>, exif: Vec<Entry>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(if le { b"II\x2a\0" } else { b"MM\0\x2a" });
    out.extend(put32(8, le));
    let pointer = (!exif.is_empty()).then(|| {
        let i = ifd0.partition_point(|e| e.tag < tag::EXIF_IFD);
        let entry = Entry {
            tag: tag::EXIF_IFD,
            typ: LONG,
            count: 1,
            value: Cow::Owned(vec![0; 4]),
        };
        ifd0.insert(i, entry);
        i
    });
    let table0 = write_ifd(&mut out, &ifd0, le)?;
    if let Some(i) = pointer {
        // Patched into the structure being built, which nothing else has seen.
        let at = table0 + 12 * i + 8;
        let exif_at = put32(u32::try_from(out.len()).ok()?, le);
        out[at..at + 4].copy_from_slice(&exif_at);
        write_ifd(&mut out, &exif, le)?;
    }
    Some(out)
}

/// Append an IFD and its values; returns where its first entry is. Values go right
/// after the table, each at an even offset (TIFF's word alignment).
fn write_ifd(out: &mut Vec<u8>, entries: &[Entry], le: bool) -> Option<usize> {
    let n = u16::try_from(entries.len()).ok()?;
    let table = out.len() + 2;
    let mut data = table + 12 * entries.len() + 4;
    out.extend(put16(n, le));
    for e in entries {
        out.extend(put16(e.tag, le));
        out.extend(put16(e.typ, le));
        out.extend(put32(e.count, le));
        let len = e.value.len();
        if len <= 4 {
            out.extend_from_slice(&e.value);
            out.extend_from_slice(&[0; 4][len..]);
        } else {
            out.extend(put32(u32::try_from(data).ok()?, le));
            data += len + len % 2;
        }
    }
    // No next IFD: the thumbnail's IFD1 is not written.
    out.extend([0; 4]);
    for e in entries.iter().filter(|e| e.value.len() > 4) {
        out.extend_from_slice(&e.value);
        if e.value.len() % 2 == 1 {
            out.push(0);
        }
    }
    Some(table)
}

/// The TIFF structure in a HEIF `Exif` item: after a 4-byte big-endian offset to it
/// (ISO/IEC 23008-12, A.2.1), usually 0 or the 6 of an `Exif\0\0` header.
pub fn from_heif_block(block: &[u8]) -> Option<&[u8]> {
    let off = u32::from_be_bytes(block.get(..4)?.try_into().ok()?) as usize;
    block.get(4usize.checked_add(off)?..)
}

/// The filtered EXIF of a HEIF's primary image. A block larger than [`MAX_EXIF`] is not
/// read: libheif would allocate whatever size the file claims.
pub fn from_heif(handle: &libheif_rs::ImageHandle) -> Option<Vec<u8>> {
    let mut ids = [0; 1];
    if handle.metadata_block_ids(&mut ids, b"Exif") == 0 || handle.metadata_size(ids[0]) > MAX_EXIF
    {
        return None;
    }
    let block = handle.metadata(ids[0]).ok()?;
    filter(from_heif_block(&block)?)
}

/// The filtered EXIF of an image the `image` crate decodes: its own for JPEG, PNG and
/// WebP; a TIFF's is the file's first IFD itself (the crate reads none from TIFF), and
/// the filter drops the tags that describe its pixels.
pub fn from_decoder(
    format: ImageFormat,
    dec: &mut impl ImageDecoder,
    data: &[u8],
) -> Option<Vec<u8>> {
    match format {
        ImageFormat::Tiff => filter(data),
        ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP => {
            filter(&dec.exif_metadata().ok().flatten()?)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use exif::experimental::Writer;
    use exif::{Context, Field, In, Reader, Tag, Value};

    use super::*;
    use crate::config::DecodeConfig;
    use crate::stages::decode::Decoder;
    use crate::vocab::pool::BufPool;

    /// What the camera EXIF below holds that must never reach an output.
    const SECRETS: &[&str] = &[
        "BODY-SN-SECRET",
        "LENS-SN-SECRET",
        "CAMERA-SN-SECRET",
        "OWNER-SECRET",
        "UNIQUE-ID-SECRET",
        "MAKERNOTE-SECRET",
        "COMMENT-SECRET",
        "INTEROP-SECRET",
        "THUMB-SECRET",
    ];

    fn ascii(s: &str) -> Value {
        Value::Ascii(vec![s.as_bytes().to_vec()])
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    /// An EXIF as a camera writes it, with everything the filter must drop: GPS, serials,
    /// owner, unique id, MakerNote, UserComment, an Interoperability IFD, a thumbnail
    /// (IFD1, with a JPEG), orientation 6, the input's size and colour space. Written by
    /// kamadak-exif, not by the module under test.
    fn camera_exif(little_endian: bool) -> Vec<u8> {
        let p = In::PRIMARY;
        let f = |tag, ifd_num, value| Field {
            tag,
            ifd_num,
            value,
        };
        let rational = |v: &[(u32, u32)]| Value::Rational(v.iter().map(|&r| r.into()).collect());
        let fields = vec![
            f(Tag::Make, p, ascii("HotpipeCam")),
            f(Tag::Model, p, ascii("HP-1 Mark II")),
            f(Tag::Orientation, p, Value::Short(vec![6])),
            f(Tag::XResolution, p, rational(&[(300, 1)])),
            f(Tag::ImageWidth, p, Value::Long(vec![4000])),
            f(Tag(Context::Tiff, 0xC62F), p, ascii("CAMERA-SN-SECRET")),
            f(Tag::DateTimeOriginal, p, ascii("2024:05:06 07:08:09")),
            f(Tag::ExposureTime, p, rational(&[(1, 250)])),
            f(Tag::LensModel, p, ascii("Prime 50mm")),
            f(Tag::BodySerialNumber, p, ascii("BODY-SN-SECRET")),
            f(Tag::LensSerialNumber, p, ascii("LENS-SN-SECRET")),
            f(Tag::CameraOwnerName, p, ascii("OWNER-SECRET")),
            f(Tag::ImageUniqueID, p, ascii("UNIQUE-ID-SECRET")),
            f(
                Tag::MakerNote,
                p,
                Value::Undefined(b"MAKERNOTE-SECRET".to_vec(), 0),
            ),
            f(
                Tag::UserComment,
                p,
                Value::Undefined(b"ASCII\0\0\0COMMENT-SECRET".to_vec(), 0),
            ),
            f(Tag::ColorSpace, p, Value::Short(vec![0xFFFF])),
            f(Tag::PixelXDimension, p, Value::Long(vec![4000])),
            f(Tag::GPSLatitudeRef, p, ascii("N")),
            f(
                Tag::GPSLatitude,
                p,
                rational(&[(51, 1), (30, 1), (1234, 100)]),
            ),
            f(Tag::InteroperabilityIndex, p, ascii("INTEROP-SECRET")),
            f(Tag::Compression, In::THUMBNAIL, Value::Short(vec![6])),
            f(Tag::ImageDescription, In::THUMBNAIL, ascii("THUMB-SECRET")),
        ];
        let mut w = Writer::new();
        fields.iter().for_each(|f| w.push_field(f));
        w.set_jpeg(b"\xFF\xD8THUMB-SECRET\xFF\xD9", In::THUMBNAIL);
        let mut out = Cursor::new(Vec::new());
        w.write(&mut out, little_endian).unwrap();
        out.into_inner()
    }

    /// An EXIF read back by kamadak-exif, which must find it valid.
    fn read(tiff: &[u8]) -> exif::Exif {
        Reader::new()
            .read_raw(tiff.to_vec())
            .expect("kamadak-exif reads the result")
    }

    fn text(e: &exif::Exif, tag: Tag) -> Option<String> {
        match &e.get_field(tag, In::PRIMARY)?.value {
            Value::Ascii(v) => Some(String::from_utf8_lossy(&v[0]).into_owned()),
            _ => None,
        }
    }

    fn uint(e: &exif::Exif, tag: Tag) -> Option<u32> {
        e.get_field(tag, In::PRIMARY)?.value.get_uint(0)
    }

    /// What an output must and must not say, as read by kamadak-exif.
    fn assert_safe(tiff: &[u8]) {
        for s in SECRETS {
            assert!(!contains(tiff, s), "{s} leaked");
        }
        let e = read(tiff);
        assert_eq!(text(&e, Tag::Make).as_deref(), Some("HotpipeCam"));
        assert_eq!(text(&e, Tag::Model).as_deref(), Some("HP-1 Mark II"));
        assert_eq!(
            text(&e, Tag::DateTimeOriginal).as_deref(),
            Some("2024:05:06 07:08:09")
        );
        assert_eq!(uint(&e, Tag::Orientation), Some(1), "upright");
        for f in e.fields() {
            let Tag(ctx, n) = f.tag;
            assert_eq!(f.ifd_num, In::PRIMARY, "no thumbnail IFD: {f:?}");
            assert!(!matches!(ctx, Context::Gps | Context::Interop), "{f:?}");
            assert!(
                ![
                    0x8825, 0xA005, 0x927C, 0x9286, 0xA420, 0xA430, 0xA431, 0xA435, 0xC62F
                ]
                .contains(&n),
                "{f:?} kept"
            );
        }
    }

    #[test]
    fn filter_drops_what_is_private_and_keeps_the_camera() {
        for le in [true, false] {
            let raw = camera_exif(le);
            // The input really holds all of it (else the test proves nothing).
            SECRETS
                .iter()
                .for_each(|s| assert!(contains(&raw, s), "{s}"));
            let input = read(&raw);
            assert!(input.get_field(Tag::GPSLatitude, In::PRIMARY).is_some());
            assert!(
                input
                    .get_field(Tag::ImageDescription, In::THUMBNAIL)
                    .is_some()
            );
            assert_eq!(uint(&input, Tag::Orientation), Some(6));

            let kept = filter(&raw).expect("the camera's tags are kept");
            assert_safe(&kept);
            assert_eq!(kept[..2], raw[..2], "the byte order is the input's");
            let e = read(&kept);
            assert_eq!(text(&e, Tag::LensModel).as_deref(), Some("Prime 50mm"));
            let exposure = &e.get_field(Tag::ExposureTime, In::PRIMARY).unwrap().value;
            assert!(matches!(exposure, Value::Rational(r) if (r[0].num, r[0].denom) == (1, 250)));
            assert_eq!(
                uint(&e, Tag::XResolution),
                None,
                "a rational, not an integer"
            );
            assert!(e.get_field(Tag::XResolution, In::PRIMARY).is_some());
            assert_eq!(uint(&e, Tag::ColorSpace), Some(1), "sRGB, as converted");
            assert!(e.get_field(Tag::ImageWidth, In::PRIMARY).is_none());
            assert!(e.get_field(Tag::PixelXDimension, In::PRIMARY).is_none());
            // Filtering what is already filtered changes nothing: the layout is canonical.
            assert_eq!(filter(&kept).as_deref(), Some(&kept[..]));
            // The APP1 form (with its header) is the same EXIF.
            let app1 = [EXIF_HEADER, &raw[..]].concat();
            assert_eq!(filter(&app1), Some(kept));
        }
    }

    /// A little-endian TIFF with one IFD0 of `entries` (tag, type, count, value or
    /// offset) and `tail` after it, at offset [`tail_at`]`(entries.len())`.
    fn tiff(entries: &[(u16, u16, u32, u32)], tail: &[u8]) -> Vec<u8> {
        let mut t = b"II\x2a\0\x08\0\0\0".to_vec();
        t.extend((entries.len() as u16).to_le_bytes());
        for &(tag, typ, count, v) in entries {
            t.extend(tag.to_le_bytes());
            t.extend(typ.to_le_bytes());
            t.extend(count.to_le_bytes());
            t.extend(v.to_le_bytes());
        }
        t.extend([0; 4]);
        t.extend(tail);
        t
    }

    fn tail_at(n: usize) -> u32 {
        (8 + 2 + 12 * n + 4) as u32
    }

    #[test]
    fn malformed_metadata_gives_nothing_or_valid_exif_and_never_panics() {
        for bad in [
            &b""[..],
            b"not exif at all",
            b"Exif\0\0",
            b"II\x2a\0\xff\xff\xff\xff",
        ] {
            assert_eq!(filter(bad), None);
        }
        // Every truncation of a real EXIF: no panic, and whatever is left is valid.
        for le in [true, false] {
            let raw = camera_exif(le);
            for n in 0..raw.len() {
                if let Some(kept) = filter(&raw[..n]) {
                    read(&kept);
                }
            }
        }
        // Make "AB", an Exif IFD pointer back at IFD0 (a loop), a value far past the end,
        // a sub-IFD offset (type IFD) and a type EXIF does not define.
        let make = u32::from_le_bytes(*b"AB\0\0");
        let t = tiff(
            &[
                (0x010F, 2, 3, make),
                (0x8769, 4, 1, 8),
                (0x9000, 7, 1000, 0xFFFF_FF00),
                (0x9001, 13, 1, 8),
                (0x9002, 99, 1, 0),
            ],
            &[],
        );
        let kept = filter(&t).expect("Make survives");
        let e = read(&kept);
        assert_eq!(text(&e, Tag::Make).as_deref(), Some("AB"));
        assert_eq!(
            e.fields().len(),
            1,
            "nothing else: {:?}",
            e.fields().collect::<Vec<_>>()
        );
    }

    #[test]
    fn values_shared_by_many_entries_cannot_multiply_a_small_input() {
        // 2000 entries all pointing at one 60000-byte value: a 84 KB input that copied
        // entry by entry would be 120 MB.
        let entries: Vec<_> = (0..2000u16)
            .map(|i| (0x1000 + i, 7, 60_000, tail_at(2000)))
            .collect();
        let t = tiff(&entries, &vec![b'x'; 60_000]);
        assert!(t.len() < 100_000);
        assert_eq!(filter(&t), None);
        // A few of them fit and are kept, each with its own copy.
        let few: Vec<_> = (0..3u16)
            .map(|i| (0x1000 + i, 7, 60_000, tail_at(3)))
            .collect();
        let kept = filter(&tiff(&few, &vec![b'x'; 60_000])).unwrap();
        assert!(kept.len() > 180_000);
        assert_eq!(read(&kept).fields().len(), 3);
    }

    #[test]
    fn heif_blocks_are_read_behind_their_offset() {
        let raw = camera_exif(false);
        let plain = [&[0, 0, 0, 0][..], &raw].concat();
        assert_eq!(from_heif_block(&plain), Some(&raw[..]));
        let headed = [&[0, 0, 0, 6][..], EXIF_HEADER, &raw].concat();
        assert_eq!(from_heif_block(&headed), Some(&raw[..]));
        assert_eq!(from_heif_block(&[0, 0, 0]), None);
        assert_eq!(from_heif_block(&[0, 0, 1, 0, 1, 2]), None);
    }

    /// A 32 x 16 picture in `format` through the `image` crate, carrying `exif`.
    fn with_exif(format: image::ImageFormat, exif: &[u8]) -> Vec<u8> {
        use image::ImageEncoder;
        use image::codecs::{jpeg::JpegEncoder, png::PngEncoder, webp::WebPEncoder};
        let px: Vec<u8> = (0..32 * 16 * 3).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        let color = image::ExtendedColorType::Rgb8;
        let r = match format {
            image::ImageFormat::Jpeg => {
                let mut e = JpegEncoder::new_with_quality(&mut out, 90);
                e.set_exif_metadata(exif.to_vec()).unwrap();
                e.write_image(&px, 32, 16, color)
            }
            image::ImageFormat::Png => {
                let mut e = PngEncoder::new(&mut out);
                e.set_exif_metadata(exif.to_vec()).unwrap();
                e.write_image(&px, 32, 16, color)
            }
            _ => {
                let mut e = WebPEncoder::new_lossless(&mut out);
                e.set_exif_metadata(exif.to_vec()).unwrap();
                e.write_image(&px, 32, 16, color)
            }
        };
        r.unwrap();
        out
    }

    /// A 32 x 16 TIFF whose IFD0 has the camera's tags beside the image's own, an Exif
    /// IFD with a serial and a GPS IFD: what a TIFF from a camera or a raw converter has.
    fn tiff_with_exif() -> Vec<u8> {
        use tiff::encoder::{TiffEncoder, colortype::RGB8};
        use tiff::tags::Tag as T;
        let px: Vec<u8> = (0..32 * 16 * 3).map(|i| (i % 251) as u8).collect();
        let mut out = Cursor::new(Vec::new());
        let mut enc = TiffEncoder::new(&mut out).unwrap();
        let mut dir = enc.extra_directory().unwrap();
        dir.write_tag(T::Unknown(0x9003), "2024:05:06 07:08:09")
            .unwrap();
        dir.write_tag(T::Unknown(0xA431), "BODY-SN-SECRET").unwrap();
        let exif_at = dir.finish_with_offsets().unwrap().offset;
        let mut dir = enc.extra_directory().unwrap();
        dir.write_tag(T::Unknown(0x0001), "N").unwrap();
        let gps_at = dir.finish_with_offsets().unwrap().offset;
        let mut img = enc.new_image::<RGB8>(32, 16).unwrap();
        let d = img.encoder();
        d.write_tag(T::Make, "HotpipeCam").unwrap();
        d.write_tag(T::Model, "HP-1 Mark II").unwrap();
        d.write_tag(T::Orientation, 6u16).unwrap();
        d.write_tag(T::Unknown(0xC62F), "CAMERA-SN-SECRET").unwrap();
        d.write_tag(T::ExifDirectory, exif_at).unwrap();
        d.write_tag(T::GpsDirectory, gps_at).unwrap();
        img.write_data(&px).unwrap();
        out.into_inner()
    }

    /// A 32 x 16 HEIC carrying `exif`, through libheif's HEVC encoder.
    fn heic_with_exif(exif: &[u8]) -> Vec<u8> {
        use libheif_rs::{
            Channel, ColorSpace, CompressionFormat, HeifContext, Image, LibHeif, RgbChroma,
        };
        let mut img = Image::new(32, 16, ColorSpace::Rgb(RgbChroma::Rgb)).unwrap();
        img.create_plane(Channel::Interleaved, 32, 16, 8).unwrap();
        let plane = img.planes_mut().interleaved.unwrap();
        plane
            .data
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let lib = LibHeif::new();
        let mut enc = lib.encoder_for_format(CompressionFormat::Hevc).unwrap();
        let mut ctx = HeifContext::new().unwrap();
        let handle = ctx.encode_image(&img, &mut enc, None).unwrap();
        ctx.add_exif_metadata(&handle, exif).unwrap();
        ctx.write_to_bytes().unwrap()
    }

    #[test]
    fn decoder_keeps_the_filtered_exif_of_each_container_only_when_asked() {
        use image::ImageFormat as F;
        let raw = camera_exif(true);
        let mut jpeg = with_exif(F::Jpeg, &raw);
        let inputs = [
            ("JPEG (libjpeg-turbo)", jpeg.clone()),
            ("PNG", with_exif(F::Png, &raw)),
            ("WebP", with_exif(F::WebP, &raw)),
            ("HEIC", heic_with_exif(&raw)),
        ];
        // Stray bytes before EOI send the JPEG through the image crate's decoder instead.
        let eoi = jpeg.len() - 2;
        jpeg.splice(eoi..eoi, [0x00, 0x11]);
        let inputs = inputs.into_iter().chain([("JPEG (zune-jpeg)", jpeg)]);
        let mut plain = Decoder::new(DecodeConfig::for_tests(), BufPool::new(4));
        let mut keeping = Decoder::new(DecodeConfig::for_tests(), BufPool::new(4)).with_exif(true);
        for (what, data) in inputs {
            plain.decode(&data).unwrap();
            assert_eq!(plain.take_exif(), None, "{what}: not kept by default");
            let f = keeping.decode(&data).unwrap();
            let kept = keeping
                .take_exif()
                .unwrap_or_else(|| panic!("{what}: no EXIF"));
            assert_safe(&kept);
            if what != "HEIC" {
                // Orientation 6 was applied (HEIF ignores an EXIF orientation).
                assert_eq!((f.width, f.height), (16, 32), "{what}");
            }
            assert_eq!(keeping.take_exif(), None, "taken");
        }
        // A TIFF's own IFD0: the camera's tags stay, the image's and the serials go.
        let t = tiff_with_exif();
        let f = keeping.decode(&t).unwrap();
        assert_eq!((f.width, f.height), (16, 32));
        let kept = keeping.take_exif().expect("TIFF's EXIF");
        assert!(!contains(&kept, "SN-SECRET"));
        let e = read(&kept);
        assert_eq!(text(&e, Tag::Make).as_deref(), Some("HotpipeCam"));
        assert_eq!(
            text(&e, Tag::DateTimeOriginal).as_deref(),
            Some("2024:05:06 07:08:09")
        );
        assert_eq!(uint(&e, Tag::Orientation), Some(1));
        for tag in [
            Tag::ImageWidth,
            Tag::StripOffsets,
            Tag::BitsPerSample,
            Tag::GPSLatitudeRef,
        ] {
            assert!(e.get_field(tag, In::PRIMARY).is_none(), "{tag} kept");
        }
        // A decode that fails leaves nothing from the image before it.
        keeping.decode(&with_exif(F::Png, &raw)).unwrap();
        assert!(keeping.decode(b"not an image").is_err());
        assert_eq!(keeping.take_exif(), None);
    }
}
