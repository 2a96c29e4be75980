"""Tiny tokenizers that carry the real chat templates of a few instruct model families.

`tiny_tokenizer(name)` builds, offline and in milliseconds, a byte-level BPE tokenizer of a few
hundred tokens (trained on the small text sample below), adds the special tokens of that family
as the real checkpoint does, sets bos/eos/pad the way its tokenizer_config.json does, and sets the
chat template read verbatim from tests/chat_templates/<name>.jinja (origins: SOURCES.md there).

Only the vocabulary is fake: the templates, the special-token strings and the bos/eos/pad roles
are those of the real checkpoints, so what a template renders is what the real model would see.

Family settings (from each checkpoint's tokenizer_config.json / generation_config.json):

- qwen2_5 (Qwen/Qwen2.5-*-Instruct): no bos, eos ``<|im_end|>``, pad ``<|endoftext|>``,
  additional special tokens ``<|im_start|>``, ``<|im_end|>``; ``<tool_call>`` / ``</tool_call>`` are
  added but not special; tokenizing adds nothing.
  generation_config eos ids: ``<|im_end|>``, ``<|endoftext|>``.
- llama3 (meta-llama/Meta-Llama-3-8B-Instruct): bos ``<|begin_of_text|>``, eos ``<|eot_id|>``
  (the original upload said ``<|end_of_text|>``; the repo was later changed to ``<|eot_id|>``),
  no pad; tokenizing prepends bos. generation_config eos ids: ``<|end_of_text|>``, ``<|eot_id|>``.
  ``<|eom_id|>`` and ``<|python_tag|>`` do not exist in Llama 3.0 (reserved ids there).
- llama3_1 (meta-llama/Llama-3.1-8B-Instruct): as llama3, plus ``<|eom_id|>`` and
  ``<|python_tag|>``. generation_config eos ids: ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``.
- gemma2 (google/gemma-2-*-it): bos ``<bos>``, eos ``<eos>``, pad ``<pad>``, unk ``<unk>``
  (ids 0-3 in the order pad, eos, bos, unk, as in Gemma), additional special tokens
  ``<start_of_turn>``, ``<end_of_turn>``; tokenizing prepends bos. Turns end with ``<end_of_turn>``,
  so a rendered conversation never contains the eos token ``<eos>``.
  generation_config eos ids: ``<eos>``, ``<end_of_turn>``. (The real Gemma tokenizer is a
  SentencePiece model, not byte-level BPE; only its special tokens and template are mirrored.)

``clean_up_tokenization_spaces`` is False for all four so that decode(encode(text)) == text
(the real Llama 3 / 3.1 configs set it to True).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"
TEMPLATES = ("qwen2_5", "llama3", "llama3_1", "gemma2")

VOCAB_SIZE = 512  # byte alphabet (256) + merges, before the family's added tokens


@dataclass(frozen=True)
class Family:
    special: tuple[str, ...]  # special added tokens, appended after the trained vocabulary
    plain: tuple[str, ...] = ()  # added tokens that are not special (kept by skip_special_tokens)
    leading: tuple[str, ...] = ()  # special tokens that take the first ids (Gemma: 0..3)
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    extra: tuple[str, ...] = ()  # additional_special_tokens of tokenizer_config.json (those we have)
    add_bos: bool = False  # tok(text) with add_special_tokens=True prepends bos
    generation_eos: tuple[str, ...] = ()  # eos_token_id list of generation_config.json


_LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>")

FAMILIES: dict[str, Family] = {
    "qwen2_5": Family(
        special=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        plain=("<tool_call>", "</tool_call>"),
        eos="<|im_end|>", pad="<|endoftext|>", extra=("<|im_start|>", "<|im_end|>"),
        generation_eos=("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": Family(
        special=_LLAMA3_SPECIAL,
        bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
        generation_eos=("<|end_of_text|>", "<|eot_id|>"),
    ),
    "llama3_1": Family(
        special=_LLAMA3_SPECIAL + ("<|eom_id|>", "<|python_tag|>"),
        bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True,
        generation_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    ),
    "gemma2": Family(
        leading=("<pad>", "<eos>", "<bos>", "<unk>"),
        special=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra=("<start_of_turn>", "<end_of_turn>"),
        add_bos=True,
        generation_eos=("<eos>", "<end_of_turn>"),
    ),
}

# Training text: enough chat, prose, numbers and JSON for the BPE trainer to learn a few hundred merges.
_SAMPLE = """\
You are a helpful assistant. You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024
system user assistant model tool ipython Environment: ipython
Hello, how are you? I'm doing great. How can I help you today?
I'd like to show off how chat templating works!
What is 12 + 30? Start with 12. Add 30 to get 42. The answer is 42.
What is 7 * 8 - 5? 7*8=56
56-5=51
Answer: 51
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
Please respond with a JSON for a function call with its proper arguments that best answers the given prompt.
For each function call, return a json object with function name and arguments within XML tags.
You may call one or more functions to assist with the user query.
{"name": "get_current_temperature", "arguments": {"location": "Paris, France", "unit": "celsius"}}
{"type": "function", "function": {"name": "get_weather", "description": "Get the weather.",
 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
{"temperature": 22.5, "location": "Paris, France", "unit": "celsius"}
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 100 1000 2024 3.14159
Punctuation and symbols: ! ? . , ; : ' " ( ) [ ] { } < > / \\ | - _ = + * & ^ % $ # @ ~ `
Unicode: café, naïve, über, 東京, Ελληνικά, emoji 🙂.
"""


@functools.lru_cache(maxsize=None)
def _trained(leading: tuple[str, ...]) -> str:
    """The trained byte-level BPE (as tokenizer.json text); `leading` special tokens take ids 0.."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(leading), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SAMPLE.splitlines(keepends=True) * 4, trainer)
    return tok.to_str()


def template_text(template_name: str) -> str:
    """The chat template of `template_name`, exactly as the model repository ships it."""
    return (TEMPLATE_DIR / f"{template_name}.jinja").read_text(encoding="utf-8")


def tiny_tokenizer(template_name: str, folder: Path | None = None) -> PreTrainedTokenizerFast:
    """A tiny tokenizer of one family in TEMPLATES; saved with save_pretrained into `folder` if given.

    `AutoTokenizer.from_pretrained(folder)` loads it back with the same template and special tokens.
    """
    if template_name not in FAMILIES:
        raise ValueError(f"unknown template {template_name!r}; expected one of {TEMPLATES}")
    fam = FAMILIES[template_name]
    backend = Tokenizer.from_str(_trained(fam.leading))
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in fam.special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in fam.plain])
    if fam.add_bos:  # what add_bos_token=True builds; set here too for transformers 4.x
        bos_id = backend.token_to_id(fam.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A:0", pair=f"{fam.bos} $A:0 {fam.bos}:1 $B:1", special_tokens=[(fam.bos, bos_id)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad, unk_token=fam.unk,
        additional_special_tokens=list(fam.extra),
        add_bos_token=fam.add_bos, add_eos_token=False,
        clean_up_tokenization_spaces=False,
        chat_template=template_text(template_name),
    )
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
    return tok
