"""Plots of the resolution benchmark (issue 7): throughput, memory and FLOPs against image size.

    python benchmarks/plot.py [--json benchmarks/results/resolution.json] [--out-dir DIR]

Writes resolution_throughput.png (inference and training img/s), resolution_memory.png (peak GB of
inference and training) and resolution_flops.png (GMACs per image) beside the JSON unless --out-dir
is given. Both axes are logarithmic; a model's line stops where its runs did not complete and the
legend says why (e.g. "OOM from 1536²").
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# (file stem, [(panel title, case key, scale)], y label)
FIGURES = (
    (
        "resolution_throughput",
        [("inference", "infer_img_s", 1.0), ("training step (AdamW)", "train_img_s", 1.0)],
        "images / s",
    ),
    (
        "resolution_memory",
        [("inference", "infer_peak_bytes", 2**-30), ("training", "train_peak_bytes", 2**-30)],
        "peak device memory (GB)",
    ),
    ("resolution_flops", [("forward, batch 1", "gmacs", 1.0)], "GMACs per image (XLA FLOPs / 2)"),
)


def _series(cases: list, model: str, key: str, scale: float):
    """Sizes and values of one model's completed runs, and a note naming the sizes not measured
    with why (e.g. " (not run: 384², 1536²; OOM: 2048²)")."""
    mode = key.split("_")[0]
    xs, ys, missing = [], [], {}
    for c in sorted((c for c in cases if c["model"] == model), key=lambda c: c["size"]):
        status = c.get(mode, "ok") if mode in ("infer", "train") else "ok"
        value = c.get(key)
        if status != "ok" or value is None:
            if status != "ok":
                missing.setdefault(status.split(" (")[0], []).append(f"{c['size']}²")
            continue
        xs.append(c["size"])
        ys.append(value * scale)
    note = "; ".join(f"{why}: {', '.join(sizes)}" for why, sizes in missing.items())
    return xs, ys, f" ({note})" if note else ""


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Writes the PNG files into out_dir (created if needed); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cases, meta = result["cases"], result["meta"]
    models = list(dict.fromkeys(m for pair in meta["pairs"] for m in pair.split(":")))
    sizes = sorted({c["size"] for c in cases})
    subtitle = (
        f"{meta['device']}, bf16, ViG BiGLA {meta['bigla_impl']}, DeiT attention "
        f"{meta['attention']}" + (" (SMOKE)" if meta["smoke"] else "")
    )
    written = []
    for stem, panels, ylabel in FIGURES:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (title, key, scale) in zip(axes[0], panels, strict=True):
            drawn = False
            for i, model in enumerate(models):
                xs, ys, note = _series(cases, model, key, scale)
                style = "-" if model.startswith("vig") else "--"
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=model + note)
                    drawn = True
            ax.set(title=title, xlabel="image side (pixels)", ylabel=ylabel, xscale="log")
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
            if drawn:
                ax.set_yscale("log")
                ax.legend()
            else:
                ax.text(
                    0.5,
                    0.5,
                    "no data (e.g. no memory stats on CPU)",
                    ha="center",
                    transform=ax.transAxes,
                )
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(subtitle, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_json = pathlib.Path(__file__).resolve().parent / "results" / "resolution.json"
    parser.add_argument("--json", type=pathlib.Path, default=default_json)
    parser.add_argument("--out-dir", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    for path in plot(json.loads(args.json.read_text()), args.out_dir or args.json.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
