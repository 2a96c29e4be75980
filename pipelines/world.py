"""The embedded default: a tiny world the project builds itself, since nothing can be downloaded.

    python -m pipelines.world [--out artifacts/world] [--seed 0]
    make world WORLD_SEED=1          # another draw, in artifacts/world-seed1 (PEAR_WORLD_SEED=1)
    make world WORLD=sft-matters     # the experiment's kind of world, in artifacts/world-sft-matters

It writes ordinary Hugging Face folders and a Parquet corpus:
    tokenizer/  a byte-level BPE tokenizer with a chat template
    target/     a tiny Llama pretrained on arithmetic chains answered in two ways: mostly a quick
                guess ("Answer: 7", usually wrong), sometimes a careful step-by-step "scratch"
                procedure that is right, and a little of the behavior's "words" style
    behavior/   a tiny Llama trained on correct traces, mostly in the verbose "words" style and
                sometimes in the careful procedure
    corpus.parquet  reasoning-gym prompts answered by the behavior model with vLLM, with the
                    sampled `response_ids` and their sampling `behavior_logprobs`, filtered to
                    correct answers (rejection sampling; the Parquet metadata `world_corpus`
                    records the filter and its counts), and each response's `style` read from its
                    text (careful, words or other: trace_style)
    corpus-unfiltered.parquet  every sample, right or wrong (`make score DATA=...` takes it)
Everything is a function of the seed, on one machine: torch picks its CPU kernels by the processor
(`ATEN_CPU_CAPABILITY=default|avx2|avx512` chooses another path), and the kernel path and the thread
count change the pretraining's floating-point sums, so another machine builds another draw of the
same seed. The build fixes its thread count (`--threads`, 2 by default) rather than taking the
machine's, and `world.json` records both under `built_with`. The build is skipped when
`world.json` matches the config.

Why a guess beside a careful procedure: RL with verifiable rewards mostly sharpens what a model
already samples now and then. A base that guesses most of the time but sometimes works the sum
out has a success mode that RL can find in a few dozen steps on 2 CPU cores, so the question
the project exists for (does PEAR-weighted SFT help that RL?) can be asked here at all.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import console
from common.config import ConfigError, cli, setup_logging
from common.config import field as cli_field
from train.rollout import WORLD_TASK_KWARGS, reasoning_gym_examples

log = logging.getLogger("pear.world")

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
WORLD_VERSION = 3
# fields added after version 3, recorded only when they differ from these values, so that a world built
# before them keeps its record
STAMPED_WHEN_SET = {"target_careful_cue": 0.0, "style_column": False}


def default_seed() -> int:
    """The world every stage uses by default: seed 0, or `PEAR_WORLD_SEED` (make's WORLD_SEED)."""
    value = os.environ.get("PEAR_WORLD_SEED", "0") or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"PEAR_WORLD_SEED={value!r} is not an integer") from None


def default_kind() -> str:
    """The kind of world every stage uses by default: `embedded`, or `PEAR_WORLD` (make's WORLD)."""
    kind = os.environ.get("PEAR_WORLD", "") or "embedded"
    if kind not in WORLDS:
        raise ValueError(f"PEAR_WORLD={kind!r} is not a world; the worlds are {', '.join(WORLDS)}")
    return kind


def world_dir(seed: int | None = None, kind: str | None = None) -> Path:
    """Where the world of `kind` and `seed` lives: artifacts/world for the embedded world of seed 0,
    artifacts/world-seed<N> for its other seeds, artifacts/world-<kind>[-seed<N>] for another kind,
    so that worlds of several kinds and seeds stay cached side by side. `PEAR_WORLD_DIR` moves the
    default world (no seed or kind given) elsewhere: `make test-worlds` points the tests at draws
    built with other kernels and thread counts that way."""
    if seed is None and kind is None and os.environ.get("PEAR_WORLD_DIR"):
        return Path(os.environ["PEAR_WORLD_DIR"])
    seed = default_seed() if seed is None else seed
    kind = default_kind() if kind is None else kind
    name = "world" if kind == "embedded" else f"world-{kind}"
    return Path(f"artifacts/{name}" if seed == 0 else f"artifacts/{name}-seed{seed}")


def world_config(seed: int | None = None, kind: str | None = None) -> "WorldConfig":
    """The configuration of the world of `kind` (default: PEAR_WORLD) and `seed` (PEAR_WORLD_SEED)."""
    seed = default_seed() if seed is None else seed
    return WorldConfig(seed=seed, **WORLDS[default_kind() if kind is None else kind])


@dataclass
class WorldConfig:
    """What the embedded world is made of; changing any field rebuilds it."""

    seed: int = field(default_factory=default_seed)
    tasks: tuple = ("chain_sum",)
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    pretrain_examples: int = 6000
    target_steps: int = 1500
    behavior_steps: int = 800
    # the base's pretraining mix: a quick guess most of the time, the careful procedure
    # sometimes, and a little of the behavior's style, so that ratios vary token by token
    target_careful_share: float = 0.3
    target_words_share: float = 0.1
    # share of the base's careful traces whose prompt asks for them (CUE); asked plainly, the base
    # then starts the procedure in about careful_share x (1 - cue) of its answers
    target_careful_cue: float = 0.0
    guess_accuracy: float = 0.25  # share of the guesses that happen to be right
    # the behavior (a teacher) writes mostly its verbose style, sometimes the careful procedure
    behavior_careful_share: float = 0.25
    corpus_rows: int = 768  # prompts the behavior answers; the corpus keeps the correct ones
    # the corpus's `style` column (trace_style of each response): a function of the text, so a world
    # built without it gains it in place (add_style_column), the same draw
    style_column: bool = True
    filter_correct: bool = True
    max_new_tokens: int = 96
    # disjoint seed ranges per use, so no prompt is shared across stages
    seed_offsets: tuple = (("pretrain", 0), ("corpus", 10_000), ("rl", 20_000), ("eval", 30_000))


# The kinds of world, as changes to WorldConfig's defaults. `embedded` is every stage's default.
# `sft-matters` is the experiment's: a base that almost never writes the careful procedure on its
# own (99% of its careful traces follow a prompt that asks for them) and has never seen the
# teacher's verbose style, so RL from the base alone has little to sharpen, while the teacher's
# corpus shows the procedure (70%) next to a style the base cannot execute. Its settings were
# chosen by the rule of pipelines/experiment.py (no-SFT's post-RL pass@1 at least 0.10 below
# uniform SFT's) with no PEAR arm run; every setting tried is in results/world-selection.md.
WORLDS: dict[str, dict] = {
    "embedded": {},
    "sft-matters": {"target_careful_cue": 0.99, "target_words_share": 0.0, "behavior_careful_share": 0.7},
}


# ---- tasks and the two solution styles -------------------------------------------------------

def _steps(expression: str) -> list[tuple[int, str, int, int]]:
    """'4 - 1 + 7' -> [(4, '-', 1, 3), (3, '+', 7, 10)]."""
    toks = expression.split()
    acc = int(toks[0])
    out = []
    for op, num in zip(toks[1::2], toks[2::2]):
        new = acc + int(num) if op == "+" else acc - int(num)
        out.append((acc, op, int(num), new))
        acc = new
    return out


def scratch_style(expression: str) -> str:
    """The base model's careful procedure: one line per operation, then the answer."""
    lines = [f"{a}{op}{b}={c}" for a, op, b, c in _steps(expression)]
    return "\n".join(lines) + f"\nAnswer: {_steps(expression)[-1][3]}"


def guess_style(expression: str, rng: random.Random, accuracy: float) -> str:
    """The base model's quick guess: an answer with no working, right with probability `accuracy`."""
    answer = _steps(expression)[-1][3]
    if rng.random() >= accuracy:
        answer += rng.choice([-4, -3, -2, -1, 1, 2, 3, 4])
    return f"Answer: {answer}"


def target_text(expression: str, rng: random.Random, cfg: "WorldConfig") -> str:
    """One pretraining trace of the base: careful, words or a guess, in the config's shares."""
    u = rng.random()
    if u < cfg.target_careful_share:
        return scratch_style(expression)
    if u < cfg.target_careful_share + cfg.target_words_share:
        return words_style(expression)
    return guess_style(expression, rng, cfg.guess_accuracy)


CUE = " Work it out line by line."


def cued_questions(questions: list[str], texts: list[str], cfg: "WorldConfig") -> list[str]:
    """The base's pretraining prompts: a share `target_careful_cue` of its careful traces follow a
    prompt that asks for them (CUE), so the base can carry the procedure out but, asked plainly,
    seldom starts it. Its own random stream, so that a world without the cue is built as before."""
    if not cfg.target_careful_cue:
        return list(questions)
    rng = random.Random(cfg.seed + 7)
    return [q + CUE if not t.startswith("Answer") and "=" in t and rng.random() < cfg.target_careful_cue else q
            for q, t in zip(questions, texts)]


def words_style(expression: str) -> str:
    """The behavior policy's verbose style: always correct."""
    steps = _steps(expression)
    parts = [f"Start with {steps[0][0]}."]
    for _, op, b, c in steps:
        verb = "Add" if op == "+" else "Take away"
        parts.append(f"{verb} {b} to get {c}.")
    parts.append(f"The answer is {steps[-1][3]}.")
    return " ".join(parts)


STYLES = ("careful", "words", "other")
_CAREFUL_LINE = re.compile(r"-?\d+[+-]-?\d+=-?\d+")
_CAREFUL_END = re.compile(r"Answer: -?\d+")
_WORDS = re.compile(r"Start with -?\d+\.( (Add|Take away) -?\d+ to get -?\d+\.)+ The answer is -?\d+\.")


def trace_style(text: str) -> str:
    """The style a response is written in, from its text alone: `careful` (scratch_style's form: one
    `a+b=c` line per operation, then `Answer: N`), `words` (words_style's form: `Start with ...`) or
    `other` (a bare guess, or text that follows neither form). The form, not the arithmetic: a
    careful trace with a wrong line is still careful."""
    lines = [x.strip() for x in text.strip().split("\n")]
    if len(lines) >= 2 and all(_CAREFUL_LINE.fullmatch(x) for x in lines[:-1]) and _CAREFUL_END.fullmatch(lines[-1]):
        return "careful"
    if _WORDS.fullmatch(" ".join(lines)):
        return "words"
    return "other"


# ---- tokenizer and models ---------------------------------------------------------------------

def build_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    return hf


def new_model(tokenizer, cfg: WorldConfig, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def chat_example(tokenizer, question: str, response: str) -> tuple[list[int], int]:
    """(input_ids, prompt_len) for one templated prompt and its response, closed by <|end|>."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return list(prompt) + response_ids, len(prompt)


def pretrain(model, examples: list[tuple[list[int], int]], steps: int, seed: int, batch_size: int = 32,
             lr: float = 3e-3):
    """A short plain-SFT loop on (input_ids, prompt_len) examples; response tokens carry the loss."""
    import torch
    from train.loss import token_logprobs, weighted_nll

    g = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    body, head = model.get_decoder(), model.get_output_embeddings().weight
    for step in range(steps):
        batch = g.sample(examples, batch_size)
        T = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)  # positions t whose label ids[t+1] is scored
        for i, (x, p) in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, p - 1 : len(x) - 1] = True
        hidden = body(input_ids=ids).last_hidden_state  # right padding, causal: no attention mask
        lp = token_logprobs(hidden[mask], head, ids[:, 1:][mask[:, :-1]])
        loss = weighted_nll(lp, torch.ones_like(lp), lp.numel())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.info("pretrain step %d/%d loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return model


# ---- corpus -----------------------------------------------------------------------------------

def generate_corpus(behavior_dir: Path, tokenizer, tasks: list[dict], max_new_tokens: int, seed: int) -> list[dict]:
    """The behavior model answers every task once with vLLM at temperature 1; logprobs recorded."""
    from common.vllm_engine import generate, make_vllm_engine, shutdown_vllm
    from train.rewards import score
    from vllm import SamplingParams

    llm = make_vllm_engine(str(behavior_dir), max_model_len=512, skip_tokenizer_init=False, seed=seed)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t["question"]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for t in tasks]
    # engine-level seed: per-request seeds fail on CPU
    sp = SamplingParams(n=1, temperature=1.0, max_tokens=max_new_tokens, logprobs=0)
    outs = generate(llm, prompts, sp)
    rows = []
    for task, out in zip(tasks, outs):
        c = out.outputs[0]
        ids = list(c.token_ids)
        lps = [c.logprobs[i][tok].logprob for i, tok in enumerate(ids)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        rows.append({
            # the text is the ids' own decoding (vLLM's streaming detokenizer drops a dangling
            # partial UTF-8 byte that a plain decode keeps), so the row is self-consistent
            "prompt": task["question"], "response": text,
            "response_ids": ids,
            "behavior_logprobs": lps, "task": task["task"], "answer": task["answer"],
            "correct": score(text, {**task, "prompt": task["question"]}) == 1.0,
            "finished": c.finish_reason == "stop",
        })
    shutdown_vllm(llm)
    return rows


# ---- the build --------------------------------------------------------------------------------

def world_stamp(cfg: WorldConfig) -> dict:
    """What a built world records of its config; a world whose record differs is rebuilt. Fields added
    after version 3 are recorded only when set, so that worlds built before them stay valid."""
    stamp = {"world_version": WORLD_VERSION, **json.loads(json.dumps(asdict(cfg)))}
    return {k: v for k, v in stamp.items() if k not in STAMPED_WHEN_SET or v != STAMPED_WHEN_SET[k]}


def add_style_column(out: Path) -> None:
    """Give a built world's corpora their `style` column (trace_style of each response), in place: the
    column is a function of the text, so the draw stays what it was."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("corpus.parquet", "corpus-unfiltered.parquet"):
        path = out / name
        table = pq.read_table(path)
        if "style" in table.column_names:
            continue
        styles = pa.array([trace_style(x) for x in table.column("response").to_pylist()], pa.string())
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table.append_column("style", styles), tmp, compression="zstd")
        os.replace(tmp, path)


def upgrade_in_place(out: Path, recorded: dict, stamp: dict) -> bool:
    """A world whose record differs from `stamp` only by `style_column` set: add the column in place and
    record it; True when the world is then up to date."""
    if {k: v for k, v in stamp.items() if k != "style_column"} != recorded or not stamp.get("style_column"):
        return False
    add_style_column(out)
    built = json.loads((out / "world.json").read_text())
    (out / "world.json").write_text(json.dumps({**built, "config": stamp}, indent=1))
    log.info("world at %s: style column added in place", out)
    return True


BUILD_THREADS = 2  # torch threads of the build, whatever the machine has: the draw depends on it


def built_with(threads: int = BUILD_THREADS) -> dict:
    """What, beside the config, decides the draw a build makes on this machine: torch's CPU kernel
    path (AVX512, AVX2, DEFAULT, ...), the thread count and torch's version. `world.json` records it
    as `built_with`; compare two worlds' records to know whether they are the same draw."""
    import torch

    return {"kernel": torch.backends.cpu.get_cpu_capability(), "threads": threads, "torch": torch.__version__}


def build(out: Path, cfg: WorldConfig, force: bool = False, threads: int = BUILD_THREADS) -> Path:
    """Build (or reuse) the world under `out` with `threads` torch threads; returns `out`. Safe to
    call from many processes. A cached world is reused whatever machine built it (`built_with`
    says which)."""
    import fcntl

    stamp = world_stamp(cfg)
    marker = out / "world.json"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builders wait, then find it built
        recorded = json.loads(marker.read_text()).get("config") if marker.exists() else None
        if not force and recorded is not None and (recorded == stamp or upgrade_in_place(out, recorded, stamp)):
            log.info("world up to date at %s", out)
            return out
        marker.unlink(missing_ok=True)
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _build(out, cfg, stamp, threads)
        finally:
            # torch's own setter: vLLM's CPU worker replaces torch.set_num_threads with a no-op in
            # every process that starts an engine, as the corpus sampling does
            torch._C.set_num_threads(previous_threads)
    return out


def _build(out: Path, cfg: WorldConfig, stamp: dict, threads: int) -> None:
    marker = out / "world.json"
    t0 = time.time()
    offsets = dict(cfg.seed_offsets)

    # the tasks as RL and evaluation generate them (train.rollout), with the world's settings
    pre_tasks = reasoning_gym_examples(cfg.tasks, cfg.pretrain_examples, cfg.seed + offsets["pretrain"],
                                       WORLD_TASK_KWARGS)
    rng = random.Random(cfg.seed)
    target_texts = [target_text(t["metadata"]["expression"], rng, cfg) for t in pre_tasks]
    behavior_texts = [scratch_style(t["metadata"]["expression"]) if rng.random() < cfg.behavior_careful_share
                      else words_style(t["metadata"]["expression"]) for t in pre_tasks]
    questions = [t["question"] for t in pre_tasks]
    target_questions = cued_questions(questions, target_texts, cfg)
    tokenizer = build_tokenizer(questions + target_texts + behavior_texts
                                + ([CUE] if cfg.target_careful_cue else []), cfg.vocab_size, out / "tokenizer")

    for name, qs, texts, steps, seed in (("target", target_questions, target_texts, cfg.target_steps, cfg.seed + 1),
                                         ("behavior", questions, behavior_texts, cfg.behavior_steps, cfg.seed + 2)):
        model = new_model(tokenizer, cfg, seed)
        examples = [chat_example(tokenizer, q, x) for q, x in zip(qs, texts)]
        pretrain(model, examples, steps, seed)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        log.info("%s model saved (%.0fs so far)", name, time.time() - t0)

    corpus_tasks = reasoning_gym_examples(cfg.tasks, cfg.corpus_rows, cfg.seed + offsets["corpus"], WORLD_TASK_KWARGS)
    rows = generate_corpus(out / "behavior", tokenizer, corpus_tasks, cfg.max_new_tokens, cfg.seed)
    for i, r in enumerate(rows):
        r["id"] = f"world-{cfg.seed}-{i:06d}"
        if cfg.style_column:
            r["style"] = trace_style(r["response"])
    kept = [r for r in rows if r["correct"]] if cfg.filter_correct else rows
    filter_meta = {"filter": "correct" if cfg.filter_correct else "none", "reward": "full credit (train.rewards.score)",
                   "rows_generated": len(rows), "rows_kept": len(kept)}
    write_corpus(rows, out / "corpus-unfiltered.parquet", {**filter_meta, "filter": "none", "rows_kept": len(rows)})
    write_corpus(kept, out / "corpus.parquet", filter_meta)
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    marker.write_text(json.dumps({"config": stamp, "built_with": built_with(threads), "corpus_rows": len(kept),
                                  "corpus_rows_generated": len(rows), "behavior_accuracy": accuracy,
                                  "build_seconds": round(time.time() - t0, 1)},
                                 indent=1))
    log.info("world built in %.0fs: behavior accuracy %.2f, %d of %d corpus rows kept (%s)",
             time.time() - t0, accuracy, len(kept), len(rows), filter_meta["filter"])


def write_corpus(rows: list[dict], path: Path, meta: dict) -> None:
    """The corpus as zstd Parquet, with how it was filtered under the metadata key `world_corpus`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"world_corpus": json.dumps(meta)})
    pq.write_table(table, path, compression="zstd")


@dataclass
class BuildConfig:
    """Build (or reuse) one draw of a kind of world."""

    world: str = cli_field("", "the kind of world, one of WORLDS (default: PEAR_WORLD, else embedded)")
    seed: int | None = cli_field(None, "the draw (default: PEAR_WORLD_SEED, else 0)")
    out: str = cli_field("", "default: artifacts/world[-<kind>][-seed<N>] (world_dir)")
    force: bool = cli_field(False, "rebuild even when the cached world matches")
    threads: int = cli_field(BUILD_THREADS, "torch threads of the build (the draw depends on them)")


def run(cfg: BuildConfig) -> Path:
    kind = cfg.world or default_kind()
    if kind not in WORLDS:
        raise ConfigError(f"--world {kind!r} is not a world; the worlds are {', '.join(WORLDS)}")
    out = Path(cfg.out) if cfg.out else world_dir(cfg.seed, kind)
    console.quiet(out / "build.log")
    if cfg.threads < 1:
        raise ConfigError(f"--threads {cfg.threads}: must be at least 1")
    return build(out, world_config(cfg.seed, kind), force=cfg.force, threads=cfg.threads)


def main(argv=None) -> int:
    setup_logging()
    return cli(BuildConfig, argv, __doc__, run, lambda out: f"world in {out}", errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
