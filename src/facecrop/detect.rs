//! MTCNN's three-stage cascade over a batch of working images: the image pyramid and
//! P-Net, then R-Net and O-Net on candidate crops, with bounding-box regression and
//! non-maximum suppression between the stages.
//!
//! It mirrors facenet-pytorch 2.6.0's `detect_face` step by step (pyramid scales with
//! factor 0.709 starting at 12 / min_face, "area" resampling, normalisation
//! `(x - 127.5) * 0.0078125`, the same thresholds, NMS kinds and IoU limits, `rerec`,
//! `pad` and `bbreg` with their +1 conventions) so its boxes agree with the Python
//! tool users compare against. Where it differs, it is for speed and does not change
//! results: the networks run on the configured device, but everything per candidate
//! (box decoding, NMS, the 24 x 24 and 48 x 48 crops) runs in plain Rust on the CPU,
//! which avoids hundreds of tiny tensor operations per image; R-Net and O-Net run once
//! per stage on the candidates of every image in the batch, and P-Net runs once per
//! pyramid level on all images of the same size.

use std::collections::BTreeMap;

use tch::{Device, Kind, TchError, Tensor};

use super::nets::Nets;
use super::nms::{Cand, Overlap, nms};

/// The pyramid's scale step (facenet-pytorch's default `factor`).
pub const FACTOR: f64 = 0.709;

/// Most candidates sent through R-Net or O-Net in one forward call: bounds the
/// activations (O-Net's first layer is about 270 KB per candidate) whatever the input.
const NET_CHUNK: usize = 256;

/// A packed RGB8 image the detector works on (the decoded frame, scaled down to the
/// working resolution).
pub struct WorkImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
    /// Smallest face to look for, in this image's pixels (at least 12, P-Net's window).
    pub min_face: f64,
    /// Score thresholds of P-Net, R-Net and O-Net for this image.
    pub thresholds: [f32; 3],
}

impl WorkImage {
    pub fn view(&self) -> View<'_> {
        View {
            width: self.width,
            height: self.height,
            pixels: &self.pixels,
        }
    }
}

/// A borrowed packed RGB8 image: a working copy or the decoded original.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub width: usize,
    pub height: usize,
    pub pixels: &'a [u8],
}

/// One detected face, in working-image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    /// x0, y0, x1, y1.
    pub bbox: [f32; 4],
    pub score: f32,
    /// Left eye, right eye, nose, left and right mouth corner, as (x, y).
    pub landmarks: [[f32; 2]; 5],
}

/// Pyramid scales for an image whose shorter side is `min_side` (facenet-pytorch:
/// `m = 12 / minsize`, then `*= factor` while the scaled shorter side is >= 12).
pub fn scales(min_side: usize, min_face: f64) -> Vec<f64> {
    let m = 12.0 / min_face;
    let mut minl = min_side as f64 * m;
    let mut s = m;
    let mut out = Vec::new();
    while minl >= 12.0 {
        out.push(s);
        s *= FACTOR;
        minl *= FACTOR;
    }
    out
}

/// Detect faces in every image (the whole cascade on the whole image). Returns, per
/// image, the faces in descending score order. `ints` is scratch for integral images,
/// kept by the caller so their buffers are reused.
pub fn detect(
    nets: &Nets,
    images: &[WorkImage],
    ints: &mut Vec<Integral>,
) -> Result<Vec<Vec<Face>>, TchError> {
    let _guard = tch::no_grad_guard();
    let dev = nets.device;
    let t0 = std::time::Instant::now();
    if ints.len() < images.len() {
        ints.resize_with(images.len(), Integral::default);
    }
    for (im, int) in images.iter().zip(ints.iter_mut()) {
        int.build(&im.view(), 0, 0, im.width, im.height);
    }

    // Stage 1: P-Net over each image's pyramid. Images of the same size (and min_face)
    // share their pyramid levels, so they run as one batch. Each level is an "area"
    // resample of the image (PyTorch's adaptive average pooling, as facenet-pytorch
    // makes it), read off the integral image.
    let mut groups: BTreeMap<(usize, usize, u64), Vec<usize>> = BTreeMap::new();
    for (i, im) in images.iter().enumerate() {
        groups
            .entry((im.width, im.height, im.min_face.to_bits()))
            .or_default()
            .push(i);
    }
    let mut per_image: Vec<Vec<Cand>> = vec![Vec::new(); images.len()];
    let mut buf = Vec::new();
    for ((w, h, _), idx) in groups {
        let n = idx.len();
        for scale in scales(w.min(h), images[idx[0]].min_face) {
            let hs = (h as f64 * scale + 1.0) as usize;
            let ws = (w as f64 * scale + 1.0) as usize;
            let (rows, cols) = (level_bins(0, hs, h, hs), level_bins(0, ws, w, ws));
            buf.clear();
            for &i in &idx {
                ints[i].sample(rows.clone(), cols.clone(), &mut buf);
            }
            let (prob, reg) = nets.pnet.forward(&nchw(&buf, n, hs, ws, dev)?)?;
            let (ph, pw) = (prob.size()[1] as usize, prob.size()[2] as usize);
            let prob = to_vec(&prob)?;
            let reg = to_vec(&reg)?;
            for (k, &img) in idx.iter().enumerate() {
                let p = &prob[k * ph * pw..(k + 1) * ph * pw];
                let r = &reg[k * 4 * ph * pw..(k + 1) * 4 * ph * pw];
                let t = images[img].thresholds[0];
                let cands = generate(p, r, (pw, ph), (0, 0), scale as f32, t, img);
                let keep = nms(&cands, 0.5, Overlap::Union);
                per_image[img].extend(keep.into_iter().map(|j| cands[j]));
            }
        }
    }
    let mut cands = Vec::new();
    for c in per_image {
        merge_levels(&c, &mut cands);
    }
    let views: Vec<View> = images.iter().map(WorkImage::view).collect();
    let thresholds: Vec<[f32; 3]> = images.iter().map(|im| im.thresholds).collect();
    finish(nets, &views, Some(ints), cands, &thresholds, t0)
}

/// One image's P-Net candidates from every level: NMS across levels, then P-Net's own
/// regression (without the +1 of `bbreg`, as upstream) and squaring, appended to `out`.
fn merge_levels(c: &[Cand], out: &mut Vec<Cand>) {
    for j in nms(c, 0.7, Overlap::Union) {
        let mut k = c[j];
        let (rw, rh) = (k.b[2] - k.b[0], k.b[3] - k.b[1]);
        k.b = rerec([
            k.b[0] + k.reg[0] * rw,
            k.b[1] + k.reg[1] * rh,
            k.b[2] + k.reg[2] * rw,
            k.b[3] + k.reg[3] * rh,
        ]);
        out.push(k);
    }
}

/// In the fine pass, pyramid levels whose 12-pixel P-Net window is smaller than this
/// fraction of a seed face are not searched: their windows see a part of the face
/// (an eye, a mouth corner), which R-Net and O-Net reject or which end as a small box
/// inside the face that the final NMS drops. They are where a full-image pyramid spends
/// most of its work, since a level's cost grows with the square of its scale.
pub const FINE_MIN_WINDOW: f64 = 0.25;

/// How far around a seed face the fine pass searches, in P-Net windows of the level
/// (a window that overlaps the face can regress onto it) plus this fraction of the face.
const FINE_PAD: f64 = 0.25;

/// The fine pass on one image: the cascade again on `view` (the decoded photo, or a copy
/// of it at `refine_size`) around each seed face (a face the coarse pass found, in `view`
/// pixels), on the pyramid levels facenet-pytorch would use for a face of that size on
/// the whole image. Inside those windows the input of every network is what it would be
/// on the whole image (each level's pixels are area averages over the same source pixels,
/// computed from an integral image; windows start on P-Net's stride), so the boxes are
/// the full-resolution cascade's (bit for bit in the test, IoU >= 0.978 against
/// facenet-pytorch on 200 reference photos), at a fraction of its cost. Where they could
/// still differ: a candidate just outside a window no longer suppresses one inside it in
/// P-Net's NMS, and the skipped small-window levels cannot win the final NMS. `min_face` is in
/// `view` pixels. One image at a time so that one integral image (`int`, reused) is
/// alive, not one per photo of a batch: it is 12 bytes per pixel of the search window.
pub fn refine(
    nets: &Nets,
    view: View,
    seeds: &[[f32; 4]],
    min_face: f64,
    thresholds: [f32; 3],
    int: &mut Integral,
) -> Result<Vec<Face>, TchError> {
    let _guard = tch::no_grad_guard();
    let t0 = std::time::Instant::now();
    let (levels, union) = fine_levels(view.width, view.height, seeds, min_face);
    if levels.is_empty() {
        return Ok(Vec::new());
    }
    int.build(
        &view,
        union[0],
        union[1],
        union[2] - union[0],
        union[3] - union[1],
    );
    let per = fine_pnet(nets, &view, levels, int, thresholds[0])?;
    let mut cands = Vec::new();
    merge_levels(&per, &mut cands);
    let mut faces = finish(
        nets,
        &[view],
        Some(std::slice::from_ref(int)),
        cands,
        &[thresholds],
        t0,
    )?;
    Ok(faces.pop().unwrap_or_default())
}

/// A pyramid level of the fine pass: its scale and size, and the windows of its pixels
/// searched (`[r0, r1, c0, c1]`, from [`level_span`]; one per seed, overlapping ones
/// merged: two faces far apart must not make the window the whole level).
struct FineLevel {
    scale: f64,
    hs: usize,
    ws: usize,
    rects: Vec<[usize; 4]>,
}

/// The fine pass's levels for `seeds` on a `w x h` image (those with no seed big enough
/// for their P-Net window left out), and the image rectangle `[x0, y0, x1, y1]` their
/// windows, and the crops of R-Net and O-Net, are made of.
fn fine_levels(
    w: usize,
    h: usize,
    seeds: &[[f32; 4]],
    min_face: f64,
) -> (Vec<FineLevel>, [usize; 4]) {
    let fmax = seeds
        .iter()
        .map(|b| (b[2] - b[0]).max(b[3] - b[1]) as f64)
        .fold(0.0, f64::max);
    let mut levels = Vec::new();
    let pad = (FINE_PAD * fmax) as usize;
    let mut union = [usize::MAX, usize::MAX, 0, 0];
    for scale in scales(w.min(h), min_face) {
        let win = 12.0 / scale;
        let hs = (h as f64 * scale + 1.0) as usize;
        let ws = (w as f64 * scale + 1.0) as usize;
        let mut rects: Vec<[usize; 4]> = Vec::new();
        for b in seeds {
            let f = (b[2] - b[0]).max(b[3] - b[1]) as f64;
            if win < FINE_MIN_WINDOW * f {
                continue;
            }
            let p = win + FINE_PAD * f;
            let (r0, r1) = level_span(b[1] as f64 - p, b[3] as f64 + p, h, hs);
            let (c0, c1) = level_span(b[0] as f64 - p, b[2] as f64 + p, w, ws);
            rects.push([r0, r1, c0, c1]);
        }
        if rects.is_empty() {
            continue;
        }
        let rects = merge_windows(rects, hs, ws);
        for &[r0, r1, c0, c1] in &rects {
            union = [
                union[0].min((c0 * w / ws).saturating_sub(pad)),
                union[1].min((r0 * h / hs).saturating_sub(pad)),
                union[2].max(((c1 * w).div_ceil(ws) + pad).min(w)),
                union[3].max(((r1 * h).div_ceil(hs) + pad).min(h)),
            ];
        }
        levels.push(FineLevel {
            scale,
            hs,
            ws,
            rects,
        });
    }
    (levels, union)
}

/// P-Net on each window of `levels`, sampled from `int` (built over the levels' union
/// of `view`), keeping candidates scoring at least `threshold`: each level's candidates
/// after their NMS.
fn fine_pnet(
    nets: &Nets,
    view: &View,
    levels: Vec<FineLevel>,
    int: &Integral,
    threshold: f32,
) -> Result<Vec<Cand>, TchError> {
    let dev = nets.device;
    let (w, h) = (view.width, view.height);
    let mut per = Vec::new();
    let mut buf = Vec::new();
    for FineLevel {
        scale,
        hs,
        ws,
        rects,
    } in levels
    {
        let mut level = Vec::new();
        for [r0, r1, c0, c1] in rects {
            let (rows, cols) = (level_bins(r0, r1, h, hs), level_bins(c0, c1, w, ws));
            buf.clear();
            int.sample(rows, cols, &mut buf);
            let (prob, reg) = nets.pnet.forward(&nchw(&buf, 1, r1 - r0, c1 - c0, dev)?)?;
            let (ph, pw) = (prob.size()[1] as usize, prob.size()[2] as usize);
            level.extend(generate(
                &to_vec(&prob)?,
                &to_vec(&reg)?,
                (pw, ph),
                (c0 / 2, r0 / 2),
                scale as f32,
                threshold,
                0,
            ));
        }
        // One NMS over the level's windows together, as over the whole level.
        per.extend(
            nms(&level, 0.5, Overlap::Union)
                .into_iter()
                .map(|j| level[j]),
        );
    }
    Ok(per)
}

/// Level windows (`[r0, r1, c0, c1]`, from [`level_span`]) with every overlapping pair
/// replaced by its bounding box until none overlap. Starts stay even; a merged window
/// ending inside the level is kept at even length (see [`level_span`]).
fn merge_windows(mut rects: Vec<[usize; 4]>, hs: usize, ws: usize) -> Vec<[usize; 4]> {
    let even = |s: usize, e: usize, n: usize| if e < n && (e - s) % 2 == 1 { e + 1 } else { e };
    loop {
        let mut merged = false;
        'pairs: for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                let (a, b) = (rects[i], rects[j]);
                if a[0] < b[1] && b[0] < a[1] && a[2] < b[3] && b[2] < a[3] {
                    let (r0, c0) = (a[0].min(b[0]), a[2].min(b[2]));
                    let (r1, c1) = (a[1].max(b[1]), a[3].max(b[3]));
                    rects[i] = [r0, even(r0, r1, hs), c0, even(c0, c1, ws)];
                    rects.swap_remove(j);
                    merged = true;
                    break 'pairs;
                }
            }
        }
        if !merged {
            return rects;
        }
    }
}

/// The pixels of a level `ns` pixels long (over `n` image pixels) whose area-average
/// bins meet image pixels `[a, b)`: starting on an even pixel (P-Net's stride, so the
/// window's output cells are the whole level's), at least 12 long (P-Net's window), and
/// of even length unless it ends at the level's edge (so `ceil_mode` pooling makes no
/// partial cell that the whole level would not have).
fn level_span(a: f64, b: f64, n: usize, ns: usize) -> (usize, usize) {
    let (a, b) = (a.max(0.0), b.min(n as f64).max(0.0));
    let mut s = ((a * ns as f64 / n as f64).floor() as usize).min(ns) & !1;
    let mut e = ((b * ns as f64 / n as f64).ceil() as usize).clamp(s, ns);
    if e - s < 12 {
        e = (s + 12).min(ns);
        s = s.min(e.saturating_sub(12)) & !1;
    }
    if e < ns && (e - s) % 2 == 1 {
        e += 1;
    }
    (s, e)
}

/// A summed-area table over a rectangle of an RGB8 image: any box's channel sums in four
/// lookups, so every pyramid level and every crop of the fine pass is an exact "area"
/// resample at a cost per output pixel, not per source pixel. Sums wrap (u32): a box
/// sum is exact while the box holds under 2^32 / 255 pixels (16.8 million), far above
/// any level cell or crop cell. Kept by the caller and rebuilt in place, so its buffer
/// is reused from photo to photo.
#[derive(Default)]
pub struct Integral {
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
    sums: Vec<u32>,
}

impl Integral {
    /// Rebuild over the `w x h` rectangle of `v` at (`x0`, `y0`).
    pub fn build(&mut self, v: &View, x0: usize, y0: usize, w: usize, h: usize) {
        (self.x0, self.y0, self.w, self.h) = (x0, y0, w, h);
        let stride = (w + 1) * 3;
        self.sums.clear();
        self.sums.resize(stride * (h + 1), 0);
        for y in 0..h {
            let start = ((y0 + y) * v.width + x0) * 3;
            let row = &v.pixels[start..start + w * 3];
            let (prev, cur) = self.sums.split_at_mut((y + 1) * stride);
            let prev = &prev[y * stride + 3..];
            let cur = &mut cur[3..stride];
            let mut acc = [0u32; 3];
            for ((px, up), dst) in row
                .chunks_exact(3)
                .zip(prev.chunks_exact(3))
                .zip(cur.chunks_exact_mut(3))
            {
                for c in 0..3 {
                    acc[c] = acc[c].wrapping_add(px[c] as u32);
                    dst[c] = up[c].wrapping_add(acc[c]);
                }
            }
        }
    }

    fn covers(&self, x0: usize, y0: usize, w: usize, h: usize) -> bool {
        x0 >= self.x0 && y0 >= self.y0 && x0 + w <= self.x0 + self.w && y0 + h <= self.y0 + self.h
    }

    /// The mean of each `rows[i] x cols[j]` box of image pixels (end exclusive, inside
    /// the rectangle), normalised, appended to `out` as HWC (see [`nchw`]).
    fn sample(
        &self,
        rows: impl Iterator<Item = (usize, usize)>,
        cols: impl Iterator<Item = (usize, usize)> + Clone,
        out: &mut Vec<f32>,
    ) {
        let stride = (self.w + 1) * 3;
        let s = &self.sums;
        for (ya, yb) in rows {
            let (ta, tb) = ((ya - self.y0) * stride, (yb - self.y0) * stride);
            for (xa, xb) in cols.clone() {
                let (la, lb) = ((xa - self.x0) * 3, (xb - self.x0) * 3);
                let count = ((yb - ya) * (xb - xa)) as f32;
                for c in 0..3 {
                    let v = s[tb + lb + c]
                        .wrapping_sub(s[ta + lb + c])
                        .wrapping_sub(s[tb + la + c])
                        .wrapping_add(s[ta + la + c]);
                    out.push((v as f32 / count - 127.5) * 0.0078125);
                }
            }
        }
    }
}

/// `n` HWC images of `h x w` in `data` as the N x 3 x H x W tensor the networks take, on
/// `dev`. It is a view with channels-last strides, not a copy: convolutions and pooling
/// then run libtorch's channels-last kernels, which on the CPU are several times faster
/// for these small channel counts than the NCHW max pooling (measured in PyTorch 2.11 on
/// the 2-core machine: R-Net on 256 crops 25 ms NCHW, 7 ms channels-last, 2 threads).
fn nchw(data: &[f32], n: usize, h: usize, w: usize, dev: Device) -> Result<Tensor, TchError> {
    Tensor::from_slice(data)
        .f_view([n as i64, h as i64, w as i64, 3])?
        .f_to_device(dev)?
        .f_permute([0, 3, 1, 2])
}

/// The image pixels each of level pixels `a..b` averages, for a level `ns` pixels long
/// over `n` image pixels (PyTorch's `adaptive_avg_pool2d` bins).
fn level_bins(
    a: usize,
    b: usize,
    n: usize,
    ns: usize,
) -> impl Iterator<Item = (usize, usize)> + Clone {
    (a..b).map(move |i| (i * n / ns, ((i + 1) * n).div_ceil(ns)))
}

/// Area-average bins of `n` pixels from `start` into `size` cells (PyTorch's
/// `adaptive_avg_pool2d`: cell `i` covers `floor(i*n/size) .. ceil((i+1)*n/size)`).
fn bins(start: usize, n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> + Clone {
    (0..size).map(move |i| (start + i * n / size, start + ((i + 1) * n).div_ceil(size)))
}

/// Stages 2 and 3 (R-Net and O-Net on crops of `views`, the images the candidates'
/// coordinates refer to, with each image's `thresholds`) and the final NMS. `ints`: per image, an integral image of part
/// of it that crops inside it are cut from in O(1) per output pixel.
fn finish(
    nets: &Nets,
    views: &[View],
    ints: Option<&[Integral]>,
    cands: Vec<Cand>,
    thresholds: &[[f32; 3]],
    t0: std::time::Instant,
) -> Result<Vec<Vec<Face>>, TchError> {
    let dev = nets.device;
    let n_images = views.len();
    let t1 = std::time::Instant::now();
    let n1 = cands.len();

    // Stage 2: R-Net on 24 x 24 crops of every candidate of every image.
    let (cands, crops) = crops_for(views, ints, cands, 24);
    let mut passed = Vec::new();
    if !cands.is_empty() {
        let [probs, regs] = over_chunks(&crops, cands.len(), 24, dev, |x| {
            nets.rnet.forward(x).map(|(p, r)| [p, r])
        })?;
        for (i, c) in cands.iter().enumerate() {
            if probs[i] > thresholds[c.img][1] {
                passed.push(Cand {
                    b: c.b,
                    score: probs[i],
                    reg: reg4(&regs, i),
                    img: c.img,
                });
            }
        }
    }
    let mut cands = Vec::new();
    for c in split_by_image(passed, n_images) {
        for j in nms(&c, 0.7, Overlap::Union) {
            let mut k = c[j];
            k.b = rerec(bbreg(k.b, k.reg));
            cands.push(k);
        }
    }

    let t2 = std::time::Instant::now();
    let n2 = cands.len();

    // Stage 3: O-Net on 48 x 48 crops: final score, regression, landmarks.
    let (cands, crops) = crops_for(views, ints, cands, 48);
    let mut faces: Vec<Vec<(Cand, [[f32; 2]; 5])>> = vec![Vec::new(); n_images];
    if !cands.is_empty() {
        let [probs, regs, marks] = over_chunks(&crops, cands.len(), 48, dev, |x| {
            nets.onet.forward(x).map(|(p, r, m)| [p, r, m])
        })?;
        for (i, c) in cands.iter().enumerate() {
            if probs[i] <= thresholds[c.img][2] {
                continue;
            }
            // Landmarks are relative to the box before regression (+1 / -1 as upstream).
            let wi = c.b[2] - c.b[0] + 1.0;
            let hi = c.b[3] - c.b[1] + 1.0;
            let m = &marks[i * 10..i * 10 + 10];
            let mut lm = [[0f32; 2]; 5];
            for (k, p) in lm.iter_mut().enumerate() {
                *p = [wi * m[k] + c.b[0] - 1.0, hi * m[k + 5] + c.b[1] - 1.0];
            }
            let reg = reg4(&regs, i);
            let k = Cand {
                b: bbreg(c.b, reg),
                score: probs[i],
                reg,
                img: c.img,
            };
            faces[c.img].push((k, lm));
        }
    }
    tracing::debug!(
        images = n_images,
        pnet_ms = (t1 - t0).as_secs_f64() * 1e3,
        rnet_ms = (t2 - t1).as_secs_f64() * 1e3,
        onet_ms = t2.elapsed().as_secs_f64() * 1e3,
        pnet_candidates = n1,
        rnet_candidates = n2,
        "mtcnn batch"
    );
    Ok(faces
        .into_iter()
        .map(|f| {
            let boxes: Vec<Cand> = f.iter().map(|(c, _)| *c).collect();
            nms(&boxes, 0.7, Overlap::Min)
                .into_iter()
                .map(|j| Face {
                    bbox: f[j].0.b,
                    score: f[j].0.score,
                    landmarks: f[j].1,
                })
                .collect()
        })
        .collect())
}

/// A float tensor's values on the CPU, in row-major order.
fn to_vec(t: &Tensor) -> Result<Vec<f32>, TchError> {
    let t = t
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view([-1])?;
    Vec::<f32>::try_from(&t)
}

/// Run `net` on `n` crops of `size x size` (HWC, as [`crops_for`] cuts them) in chunks
/// of at most [`NET_CHUNK`]; returns each of its `K` outputs' values, concatenated over
/// the chunks in candidate order.
fn over_chunks<const K: usize>(
    crops: &[f32],
    n: usize,
    size: usize,
    dev: Device,
    mut net: impl FnMut(&Tensor) -> Result<[Tensor; K], TchError>,
) -> Result<[Vec<f32>; K], TchError> {
    let per = 3 * size * size;
    let mut out: [Vec<f32>; K] = std::array::from_fn(|_| Vec::new());
    for (c0, c1) in chunks(n) {
        let x = nchw(&crops[c0 * per..c1 * per], c1 - c0, size, size, dev)?;
        for (o, t) in out.iter_mut().zip(net(&x)?) {
            o.extend(to_vec(&t)?);
        }
    }
    Ok(out)
}

/// Candidate `i`'s four regression values.
fn reg4(regs: &[f32], i: usize) -> [f32; 4] {
    [
        regs[i * 4],
        regs[i * 4 + 1],
        regs[i * 4 + 2],
        regs[i * 4 + 3],
    ]
}

/// `[start, end)` index ranges of at most [`NET_CHUNK`] candidates.
fn chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(NET_CHUNK)
        .map(move |s| (s, (s + NET_CHUNK).min(n)))
}

fn split_by_image(c: Vec<Cand>, n: usize) -> Vec<Vec<Cand>> {
    let mut out = vec![Vec::new(); n];
    for k in c {
        out[k.img].push(k);
    }
    out
}

/// facenet-pytorch's `generateBoundingBox`: every P-Net cell scoring at least `thresh`
/// becomes the 12 x 12 window it saw, mapped back to the image (stride 2). The maps are
/// `w x h` cells at cell `offset` of the level's (non-zero in the fine pass's windows).
fn generate(
    prob: &[f32],
    reg: &[f32],
    (w, h): (usize, usize),
    offset: (usize, usize),
    scale: f32,
    thresh: f32,
    img: usize,
) -> Vec<Cand> {
    let plane = w * h;
    let mut out = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let p = prob[i];
            if p >= thresh {
                let (fx, fy) = ((x + offset.0) as f32, (y + offset.1) as f32);
                out.push(Cand {
                    b: [
                        ((2.0 * fx + 1.0) / scale).floor(),
                        ((2.0 * fy + 1.0) / scale).floor(),
                        ((2.0 * fx + 12.0) / scale).floor(),
                        ((2.0 * fy + 12.0) / scale).floor(),
                    ],
                    score: p,
                    reg: [
                        reg[i],
                        reg[plane + i],
                        reg[2 * plane + i],
                        reg[3 * plane + i],
                    ],
                    img,
                });
            }
        }
    }
    out
}

/// Make a box square around its centre (side = the longer side).
pub fn rerec(b: [f32; 4]) -> [f32; 4] {
    let (w, h) = (b[2] - b[0], b[3] - b[1]);
    let l = w.max(h);
    let x0 = b[0] + w * 0.5 - l * 0.5;
    let y0 = b[1] + h * 0.5 - l * 0.5;
    [x0, y0, x0 + l, y0 + l]
}

/// Apply a regression (offsets as fractions of the inclusive box size).
pub fn bbreg(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let w = b[2] - b[0] + 1.0;
    let h = b[3] - b[1] + 1.0;
    [
        b[0] + reg[0] * w,
        b[1] + reg[1] * h,
        b[2] + reg[2] * w,
        b[3] + reg[3] * h,
    ]
}

/// Crops of `size` x `size` for every candidate, as facenet-pytorch's `pad` + slice +
/// "area" `imresample`: the box is truncated to integers and clamped to the image (the
/// part outside is dropped, not padded), then area-averaged. Candidates whose box lies
/// wholly outside the image are dropped. Returns the kept candidates and their crops,
/// normalised, HWC (see [`nchw`]).
fn crops_for(
    views: &[View],
    ints: Option<&[Integral]>,
    cands: Vec<Cand>,
    size: usize,
) -> (Vec<Cand>, Vec<f32>) {
    let mut kept = Vec::with_capacity(cands.len());
    let mut out = Vec::with_capacity(cands.len() * 3 * size * size);
    let mut scratch = Vec::new();
    for c in cands {
        let im = &views[c.img];
        let x = (c.b[0].trunc() as i64).max(1);
        let y = (c.b[1].trunc() as i64).max(1);
        let ex = (c.b[2].trunc() as i64).min(im.width as i64);
        let ey = (c.b[3].trunc() as i64).min(im.height as i64);
        // facenet-pytorch keeps a box when `ey > y - 1 and ex > x - 1`.
        if ey < y || ex < x {
            continue;
        }
        let (x0, y0) = ((x - 1) as usize, (y - 1) as usize);
        let (cw, ch) = ((ex - x + 1) as usize, (ey - y + 1) as usize);
        match ints.map(|i| &i[c.img]).filter(|i| i.covers(x0, y0, cw, ch)) {
            Some(int) => int.sample(bins(y0, ch, size), bins(x0, cw, size), &mut out),
            None => area_resize(im, x0, y0, cw, ch, size, &mut scratch, &mut out),
        }
        kept.push(c);
    }
    (kept, out)
}

/// PyTorch's `adaptive_avg_pool2d` (what `interpolate(mode="area")` is) of the
/// `cw x ch` window at (`x0`, `y0`) to `size x size`, normalised, appended to `out` as
/// CHW. Output cell `i` averages input `floor(i*in/out) .. ceil((i+1)*in/out)` on each
/// axis; done separably with exact integer sums (so the result equals PyTorch's up to
/// the final division's rounding). HWC, as [`nchw`] takes it.
#[allow(clippy::too_many_arguments)]
fn area_resize(
    im: &View,
    x0: usize,
    y0: usize,
    cw: usize,
    ch: usize,
    size: usize,
    cols: &mut Vec<u32>,
    out: &mut Vec<f32>,
) {
    let bounds = |i: usize, n: usize| (i * n / size, ((i + 1) * n).div_ceil(size));
    // Per input row: sums over each output column's window, for 3 channels.
    cols.clear();
    cols.resize(ch * size * 3, 0);
    for r in 0..ch {
        let row = &im.pixels[((y0 + r) * im.width + x0) * 3..((y0 + r) * im.width + x0 + cw) * 3];
        let dst = &mut cols[r * size * 3..(r + 1) * size * 3];
        for j in 0..size {
            let (a, b) = bounds(j, cw);
            let (mut s0, mut s1, mut s2) = (0u32, 0u32, 0u32);
            for px in row[a * 3..b * 3].chunks_exact(3) {
                s0 += px[0] as u32;
                s1 += px[1] as u32;
                s2 += px[2] as u32;
            }
            dst[j * 3] = s0;
            dst[j * 3 + 1] = s1;
            dst[j * 3 + 2] = s2;
        }
    }
    out.reserve(3 * size * size);
    for i in 0..size {
        let (a, b) = bounds(i, ch);
        for j in 0..size {
            let (c0, c1) = bounds(j, cw);
            let count = ((b - a) * (c1 - c0)) as f32;
            for c in 0..3 {
                let mut s = 0u32;
                for r in a..b {
                    s += cols[r * size * 3 + j * 3 + c];
                }
                out.push((s as f32 / count - 127.5) * 0.0078125);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyramid_matches_facenet() {
        // facenet-pytorch on a 100-pixel shorter side with min_face 20: 0.6, 0.4254, ...
        let s = scales(100, 20.0);
        assert!((s[0] - 0.6).abs() < 1e-12);
        assert!((s[1] - 0.6 * 0.709).abs() < 1e-12);
        let last = *s.last().unwrap();
        assert!(100.0 * last >= 12.0 && 100.0 * last * FACTOR < 12.0);
        assert!(scales(11, 12.0).is_empty());
    }

    #[test]
    fn rerec_and_bbreg() {
        assert_eq!(rerec([0.0, 0.0, 10.0, 20.0]), [-5.0, 0.0, 15.0, 20.0]);
        assert_eq!(
            bbreg([0.0, 0.0, 9.0, 9.0], [0.1, -0.1, 0.0, 0.2]),
            [1.0, -1.0, 9.0, 11.0]
        );
    }

    #[test]
    fn area_resize_averages_windows() {
        // 4 x 2 image; pixel value = x * 10 + y in every channel; 2 x 2 output.
        let mut pixels = Vec::new();
        for y in 0..2u8 {
            for x in 0..4u8 {
                pixels.extend([x * 10 + y; 3]);
            }
        }
        let im = WorkImage {
            width: 4,
            height: 2,
            pixels,
            min_face: 12.0,
            thresholds: [0.6, 0.7, 0.7],
        };
        let mut out = Vec::new();
        area_resize(&im.view(), 0, 0, 4, 2, 2, &mut Vec::new(), &mut out);
        let un = |v: f32| v / 0.0078125 + 127.5;
        // Top-left cell averages x 0..2, y 0: (0 + 10) / 2 = 5.
        assert!((un(out[0]) - 5.0).abs() < 1e-3);
        // Bottom-right (HWC: cell 3, channel 0): x 2..4, y 1: (21 + 31) / 2 = 26.
        assert!((un(out[9]) - 26.0).abs() < 1e-3);
        assert_eq!(out.len(), 12);
    }

    #[test]
    fn level_spans_keep_p_net_alignment() {
        // A 1000-pixel side at a 300-pixel level, window over image pixels 333..500.
        let (s, e) = level_span(333.0, 500.0, 1000, 300);
        assert_eq!(s % 2, 0, "starts on P-Net's stride");
        assert_eq!((e - s) % 2, 0, "even length inside the level");
        assert!(
            s * 1000 / 300 <= 333 && (e * 1000).div_ceil(300) >= 500,
            "covers it"
        );
        // A window at the level's end keeps the level's own (odd) length there.
        assert_eq!(level_span(900.0, 1000.0, 1000, 301).1, 301);
        // Too small for P-Net's 12-pixel window: grown to 12, inside the level.
        let (s, e) = level_span(10.0, 12.0, 1000, 100);
        assert!(e - s >= 12 && e <= 100 && s % 2 == 0);
        let (s, e) = level_span(995.0, 1000.0, 1000, 100);
        assert!(e - s >= 12 && e == 100 && s % 2 == 0);
    }

    #[test]
    fn integral_samples_equal_direct_area_resize() {
        let (w, h) = (37, 29);
        let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let v = View {
            width: w,
            height: h,
            pixels: &pixels,
        };
        let mut int = Integral::default();
        int.build(&v, 3, 2, 30, 25);
        for (x0, y0, cw, ch, size) in [(3, 2, 30, 25, 24), (5, 4, 13, 17, 6), (10, 9, 7, 7, 7)] {
            assert!(int.covers(x0, y0, cw, ch));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            area_resize(&v, x0, y0, cw, ch, size, &mut Vec::new(), &mut a);
            int.sample(bins(y0, ch, size), bins(x0, cw, size), &mut b);
            assert_eq!(a.len(), b.len());
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-5, "{p} {q}");
            }
        }
        assert!(!int.covers(2, 2, 5, 5));
    }

    #[test]
    fn windows_merge_only_when_they_overlap() {
        // Two faces far apart: two windows, not their bounding box.
        let far = merge_windows(vec![[0, 20, 0, 20], [80, 100, 80, 100]], 100, 100);
        assert_eq!(far.len(), 2);
        // Overlapping ones (with a third touching the merged one) become one, starting
        // even and of even length inside the level.
        let m = merge_windows(
            vec![[0, 20, 0, 20], [10, 33, 10, 31], [30, 44, 30, 42]],
            100,
            100,
        );
        assert_eq!(m, vec![[0, 44, 0, 42]]);
        let m = merge_windows(vec![[0, 20, 0, 20], [10, 31, 2, 14]], 100, 100);
        assert_eq!(m, vec![[0, 32, 0, 20]]);
        // At the level's edge an odd length stays.
        let m = merge_windows(vec![[0, 20, 0, 20], [10, 101, 10, 20]], 101, 100);
        assert_eq!(m, vec![[0, 101, 0, 20]]);
    }
}
