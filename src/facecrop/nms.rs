//! Greedy non-maximum suppression on the CPU, in plain Rust.
//!
//! Two overlap measures, because facenet-pytorch uses both and agreement with it depends
//! on matching each: torchvision's `nms` (intersection over union, areas without the
//! +1 pixel convention) after P-Net and R-Net, and its own numpy "Min" NMS (intersection
//! over the smaller area, with +1) after O-Net. Candidate counts are in the hundreds, so
//! the quadratic loop costs microseconds and a device round trip would cost more.

/// A candidate box between stages: corners, score, and the regression of the stage
/// that produced it (P-Net's offsets are applied after its NMS, as in facenet-pytorch).
#[derive(Debug, Clone, Copy)]
pub struct Cand {
    pub b: [f32; 4],
    pub score: f32,
    pub reg: [f32; 4],
    pub img: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Intersection over union, torchvision's convention (no +1).
    Union,
    /// Intersection over the smaller box, facenet-pytorch's numpy convention (+1).
    Min,
}

/// Indices of the boxes kept, highest score first: a box is dropped when its overlap
/// with an already kept, higher-scoring box exceeds `threshold`.
pub fn nms(c: &[Cand], threshold: f32, kind: Overlap) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| c[b].score.total_cmp(&c[a].score));
    let one = if kind == Overlap::Min { 1.0 } else { 0.0 };
    let area = |b: &[f32; 4]| (b[2] - b[0] + one) * (b[3] - b[1] + one);
    let mut removed = vec![false; c.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if removed[i] {
            continue;
        }
        keep.push(i);
        let bi = &c[i].b;
        let ai = area(bi);
        for &j in &order[oi + 1..] {
            if removed[j] {
                continue;
            }
            let bj = &c[j].b;
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + one).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + one).max(0.0);
            let inter = w * h;
            let aj = area(bj);
            let o = match kind {
                Overlap::Union => inter / (ai + aj - inter),
                Overlap::Min => inter / ai.min(aj),
            };
            if o > threshold {
                removed[j] = true;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(b: [f32; 4], score: f32) -> Cand {
        Cand {
            b,
            score,
            reg: [0.0; 4],
            img: 0,
        }
    }

    #[test]
    fn keeps_best_of_overlapping_and_separate_boxes() {
        let c = vec![
            cand([0.0, 0.0, 10.0, 10.0], 0.8),
            cand([1.0, 1.0, 11.0, 11.0], 0.9),
            cand([50.0, 50.0, 60.0, 60.0], 0.7),
        ];
        assert_eq!(nms(&c, 0.5, Overlap::Union), vec![1, 2]);
        // IoU of the first two is 81 / 119 = 0.68: kept apart at 0.7.
        assert_eq!(nms(&c, 0.7, Overlap::Union), vec![1, 0, 2]);
    }

    #[test]
    fn min_overlap_drops_a_box_inside_another() {
        let c = vec![
            cand([0.0, 0.0, 99.0, 99.0], 0.99),
            cand([10.0, 10.0, 29.0, 29.0], 0.98),
        ];
        // IoU is tiny (400 / 10000) but the small box lies wholly inside the big one.
        assert_eq!(nms(&c, 0.7, Overlap::Union), vec![0, 1]);
        assert_eq!(nms(&c, 0.7, Overlap::Min), vec![0]);
    }
}
