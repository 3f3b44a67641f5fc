"""Table and figures of the fused benchmark, drawn only from its measurements. Benchmarks only."""

from __future__ import annotations

from pathlib import Path


def print_fused_table(quality: dict, serving: list[dict]) -> None:
    print(f"{'preset':12s} {'bpb':>7s} {'tok/req':>8s} {'conc':>4s} {'req/s':>7s} {'chars/s':>8s} {'tok/s':>7s} "
          f"{'TTFT p50':>8s} {'ITL p50':>8s} {'peak KV MiB':>11s}")
    for r in serving:
        bpb = quality.get(r["preset"], {}).get("bits_per_byte", float("nan"))
        print(f"{r['preset']:12s} {bpb:7.4f} {r['mean_prompt_tokens'] + r['mean_output_tokens']:8.1f} "
              f"{r['concurrency']:4d} {r['requests_per_s']:7.3f} {r['output_chars_per_s']:8.1f} "
              f"{r['output_tokens_per_s']:7.1f} {r['ttft_p50']:8.3f} {r['itl_p50'] * 1000:6.1f}ms "
              f"{r['peak_kv_bytes'] / 2**20:11.1f}")


def plot_fused(quality: dict, serving: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["preset"] for r in serving))
    levels = sorted({r["concurrency"] for r in serving})

    def series(key: str, preset: str) -> list[float]:
        return [next((r[key] for r in serving if r["preset"] == preset and r["concurrency"] == c), float("nan"))
                for c in levels]

    panels = [
        ("requests_per_s", "requests/s"),
        ("output_chars_per_s", "output characters/s"),
        ("output_tokens_per_s", "output tokens/s"),
        ("ttft_p50", "TTFT p50 (s)"),
        ("itl_p50", "inter-token latency p50 (s)"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for axis, (key, title) in zip(axes.flat, panels, strict=False):
        for preset in presets:
            axis.plot(levels, series(key, preset), "o-", label=preset)
        axis.set(title=title, xlabel="concurrency", xscale="log")
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.grid(alpha=0.3)
    axes.flat[0].legend()
    bars = [
        (axes.flat[5], "tokens per request", [_tokens_per_request(serving, p) for p in presets]),
        (axes.flat[6], "peak physical KV (MiB)", [max(series("peak_kv_bytes", p)) / 2**20 for p in presets]),
        (axes.flat[7], "bits per byte (held-out domain)",
         [quality.get(p, {}).get("bits_per_byte", float("nan")) for p in presets]),
    ]
    for axis, title, values in bars:
        axis.bar(presets, values, color=[f"C{i}" for i in range(len(presets))])
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=30)
    fig.suptitle("fusedserve presets on the Python-docs workload (SmolLM2-135M, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(out_dir / "fused_dashboard.png", dpi=100)
    plt.close(fig)


def _tokens_per_request(serving: list[dict], preset: str) -> float:
    rows = [r for r in serving if r["preset"] == preset]
    return sum(r["mean_prompt_tokens"] + r["mean_output_tokens"] for r in rows) / max(len(rows), 1)
