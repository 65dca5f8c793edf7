//! Evaluation metrics: retrieval recall@k, accuracy, macro-F1, mean squared error.

/// Recall@k for each `k` of retrieving item `i` of the columns with query row `i`:
/// `sim` is `[n, n]` row-major (query rows, candidate columns). An item's rank counts
/// the candidates scored above it, and equal scores at a lower index (so ties never
/// flatter the result).
pub(crate) fn recall(sim: &[f32], n: usize, ks: &[usize]) -> Vec<f64> {
    let mut hits = vec![0usize; ks.len()];
    for i in 0..n {
        let row = &sim[i * n..(i + 1) * n];
        let own = row[i];
        let rank = row
            .iter()
            .enumerate()
            .filter(|&(j, &s)| j != i && (s > own || (s == own && j < i) || s.is_nan()))
            .count();
        for (h, &k) in hits.iter_mut().zip(ks) {
            if rank < k {
                *h += 1;
            }
        }
    }
    hits.iter().map(|&h| h as f64 / n.max(1) as f64).collect()
}

/// The transpose of a row-major `[n, n]` matrix.
pub(crate) fn transpose(sim: &[f32], n: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            t[j * n + i] = sim[i * n + j];
        }
    }
    t
}

/// Accuracy and macro-F1 (the unweighted mean of the per-class F1 over the classes
/// that occur in `truth` or `pred`).
pub(crate) fn accuracy_f1(pred: &[usize], truth: &[usize]) -> (f64, f64) {
    let n = truth.len().max(1);
    let correct = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    let classes = pred.iter().chain(truth).copied().max().map_or(0, |m| m + 1);
    let mut tp = vec![0usize; classes];
    let mut fp = vec![0usize; classes];
    let mut fn_ = vec![0usize; classes];
    for (&p, &t) in pred.iter().zip(truth) {
        if p == t {
            tp[t] += 1;
        } else {
            fp[p] += 1;
            fn_[t] += 1;
        }
    }
    let mut f1 = Vec::new();
    for c in 0..classes {
        if tp[c] + fp[c] + fn_[c] == 0 {
            continue;
        }
        f1.push(2.0 * tp[c] as f64 / (2 * tp[c] + fp[c] + fn_[c]) as f64);
    }
    let macro_f1 = if f1.is_empty() {
        0.0
    } else {
        f1.iter().sum::<f64>() / f1.len() as f64
    };
    (correct as f64 / n as f64, macro_f1)
}

/// Mean squared error over every value.
pub(crate) fn mse(pred: &[f32], truth: &[f32]) -> f64 {
    let n = truth.len().max(1);
    pred.iter()
        .zip(truth)
        .map(|(&p, &t)| (f64::from(p) - f64::from(t)).powi(2))
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_ranks_and_ties_pessimistically() {
        // Row 0 finds itself first; row 1 second; row 2 third.
        let sim = [
            0.9, 0.1, 0.2, //
            0.8, 0.5, 0.1, //
            0.7, 0.6, 0.2,
        ];
        assert_eq!(recall(&sim, 3, &[1, 2, 3]), vec![1.0 / 3.0, 2.0 / 3.0, 1.0]);
        // A tie with an earlier candidate costs a rank.
        let tie = [0.5, 0.5, 0.5, 0.5];
        assert_eq!(recall(&tie, 2, &[1]), vec![0.5]);
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0], 2),
            vec![1.0, 3.0, 2.0, 4.0]
        );
    }

    #[test]
    fn accuracy_and_macro_f1_match_hand_counts() {
        // Class 0: tp 2, fn 1; class 1: tp 1, fp 1; class 2: fp 0, fn 0, tp 0 -> absent.
        let (acc, f1) = accuracy_f1(&[0, 0, 1, 1], &[0, 0, 0, 1]);
        assert!((acc - 0.75).abs() < 1e-12);
        let f0 = 2.0 * 2.0 / (4.0 + 1.0);
        let f1c = 2.0 / (2.0 + 1.0);
        assert!((f1 - (f0 + f1c) / 2.0).abs() < 1e-12);
        assert!((mse(&[1.0, 3.0], &[0.0, 1.0]) - 2.5).abs() < 1e-12);
    }
}
