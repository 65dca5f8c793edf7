//! int8 linear maps: mlmf's int8 kernel against candle's quantized matmul (`Q8_0`, which
//! candle 0.11 runs on AVX-512 VNNI tiles of repacked weights where the CPU has them)
//! and mlmf's float32 panels, on the linear-map shapes of the CLIP ViT-B/32 image tower
//! at batch 1 (50 tokens) and of the Whisper-base encoder (1500 positions).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p mlmf --bench int8_products
//! ```
//!
//! Prints a markdown table: the median time of each product, GOP/s (two per
//! multiply-add), the ratios to mlmf's int8, and each int8 product's largest error
//! against float32 relative to the largest output; then mlmf's bfloat16 product (on the
//! BF16 tile where the CPU has one) against float32. `MLMF_INT8_KERNEL` picks mlmf's
//! int8 kernel, `MLMF_BF16_KERNEL=widen` the widening bfloat16 one (docs/encoders.md,
//! "Precision").

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use mlmf::bench::{median_s, rel_err, F32Linear, Int8Linear};

fn main() -> candle_core::Result<()> {
    let shapes = [
        ("CLIP b1 qkv", 50, 768, 2304),
        ("CLIP b1 out", 50, 768, 768),
        ("CLIP b1 fc1", 50, 768, 3072),
        ("CLIP b1 fc2", 50, 3072, 768),
        ("Whisper qkv", 1500, 512, 1536),
        ("Whisper fc1", 1500, 512, 2048),
        ("Whisper fc2", 1500, 2048, 512),
    ];
    println!("threads: {}", rayon::current_num_threads());
    let mut bf16_rows = Vec::new();
    println!(
        "| product | m x k x n | mlmf float32 GFLOP/s | mlmf int8 GOP/s | candle Q8_0 GOP/s \
         | mlmf int8 vs candle Q8_0 | mlmf int8 vs float32 | error int8 / Q8_0 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for (name, m, k, n) in shapes {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let (wv, xv) = (
            w.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?,
        );

        let f32_map = F32Linear::new(&wv, n, k);
        let int8_map = Int8Linear::new(&wv, n, k);
        let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;

        let mut want = vec![0f32; m * n];
        let mut got = vec![0f32; m * n];
        let t_f32 = median_s(|| f32_map.forward(&xv, m, &mut want));
        let t_int8 = median_s(|| int8_map.forward(&xv, m, &mut got));
        let mut q8_out = Tensor::zeros((m, n), candle_core::DType::F32, &dev)?;
        let t_q8 = median_s(|| q8_out = q8.forward(&x).expect("quantized matmul"));
        let q8v = q8_out.flatten_all()?.to_vec1::<f32>()?;

        let bf16_map = F32Linear::bf16(&wv, n, k);
        let mut bf16_out = vec![0f32; m * n];
        let t_bf16 = median_s(|| bf16_map.forward(&xv, m, &mut bf16_out));
        let ops = 2.0 * (m * k * n) as f64 / 1e9;
        bf16_rows.push(format!(
            "| {name} | {m} x {k} x {n} | {:.0} | {:.0} | {:.2}x | {:.1e} |",
            ops / t_f32,
            ops / t_bf16,
            t_f32 / t_bf16,
            rel_err(&bf16_out, &want),
        ));
        let tile = if bf16_map.on_bf16_tile() {
            "the BF16 tile"
        } else {
            "widened to float32"
        };
        if bf16_rows.len() == 1 {
            bf16_rows.insert(0, format!("\nbfloat16 products: {tile}\n"));
        }
        println!(
            "| {name} | {m} x {k} x {n} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.1e} / {:.1e} |",
            ops / t_f32,
            ops / t_int8,
            ops / t_q8,
            t_q8 / t_int8,
            t_f32 / t_int8,
            rel_err(&got, &want),
            rel_err(&q8v, &want),
        );
    }
    println!("{}", bf16_rows[0]);
    println!(
        "| product | m x k x n | mlmf float32 GFLOP/s | mlmf bfloat16 GFLOP/s \
         | bfloat16 vs float32 | error bfloat16 |"
    );
    println!("|---|---|---:|---:|---:|---|");
    for row in &bf16_rows[1..] {
        println!("{row}");
    }
    Ok(())
}
