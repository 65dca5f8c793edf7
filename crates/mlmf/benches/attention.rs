//! Self-attention on the CPU: both products in float32 (the `gemm` crate's kernels)
//! against both on the BF16 tile (as next to bfloat16 weights, or int8 weights loaded
//! where the tile is chosen), over the sequence lengths of the encoders mlmf runs: CLIP
//! ViT-B/32 (50 tokens), CLIP text (77), MiniLM-sized texts (128), ViT-B/16 (197),
//! longer sequences, and the Whisper-base encoder (1500 frames).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p mlmf --bench attention
//! ```
//!
//! Prints a markdown table: median time per call (the two alternate over rounds), the
//! ratio float32 / bfloat16, and the bfloat16 result's largest error relative to the
//! largest float32 output. The bfloat16 column runs the tile at every length; layers
//! use it from `MIN_TILE_KEYS` keys, where it pays off. On a CPU without the tile both
//! columns run float32.

use mlmf::bench::{attention, bf16_tile, median_s, rel_err, MIN_TILE_KEYS};

/// Alternating rounds per shape.
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let shapes = [
        ("CLIP image b1", 1, 50, 768, 12),
        ("CLIP image b8", 8, 50, 768, 12),
        ("CLIP text b8", 8, 77, 512, 8),
        ("text 100 b8", 8, 100, 384, 6),
        ("text 128 b8", 8, 128, 384, 6),
        ("ViT-B/16 b8", 8, 197, 768, 12),
        ("seq 256 b4", 4, 256, 768, 12),
        ("seq 512 b2", 2, 512, 768, 12),
        ("Whisper-base b1", 1, 1500, 512, 8),
    ];
    println!(
        "threads: {}; BF16 tile: {}; bfloat16 layers use it from {MIN_TILE_KEYS} keys",
        rayon::current_num_threads(),
        if bf16_tile() { "yes" } else { "no" }
    );
    println!("| attention | b x t x d (heads) | float32 | bfloat16 | float32 / bfloat16 | error bfloat16 |");
    println!("|---|---|---:|---:|---:|---|");
    for (name, b, t, d, heads) in shapes {
        let qkv: Vec<f32> = (0..b * t * 3 * d)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
            .collect();
        let mut want = vec![0f32; b * t * d];
        let mut got = vec![0f32; b * t * d];
        // Rounds alternate the two (order reversed every other round), so that a busy
        // moment of the machine falls on both; the table shows the medians over rounds.
        let (mut f32_s, mut bf16_s) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            for first in [round % 2 == 0, round % 2 == 1] {
                if first {
                    f32_s.push(median_s(|| {
                        attention(&qkv, (b, t, d, heads), false, &mut want)
                    }));
                } else {
                    bf16_s.push(median_s(|| {
                        attention(&qkv, (b, t, d, heads), true, &mut got)
                    }));
                }
            }
        }
        let (t_f32, t_bf16) = (median(f32_s), median(bf16_s));
        println!(
            "| {name} | {b} x {t} x {d} ({heads}) | {:.3} ms | {:.3} ms | {:.2}x | {:.1e} |",
            t_f32 * 1e3,
            t_bf16 * 1e3,
            t_f32 / t_bf16,
            rel_err(&got, &want)
        );
    }
}
