"""PEAR weights in TRL's `SFTTrainer` (optional extra `trl`: pip install -e ".[trl]").

    import torch
    from datasets import load_dataset
    from trl import SFTConfig
    from train.trl_trainer import PearSFTTrainer

    data = load_dataset("parquet", data_files="runs/export/*.parquet", split="train")  # scorer.export --convention trl
    gpu = torch.cuda.is_available()  # TRL trains in bf16 by default; a CPU run needs bf16=False, use_cpu=True
    args = SFTConfig(output_dir="runs/trl", bf16=gpu, use_cpu=not gpu)
    PearSFTTrainer(model="runs/score-target", args=args, train_dataset=data).train()

The rows are pre-tokenized (`input_ids`, `labels` with -100 off the trained tokens) and carry
`token_weights`, aligned to `input_ids`. The loss is the one of train/loss.py:

    loss = sum_t w_t * NLL_t / (trained tokens in the global batch)

TRL's own normalisation: `num_items_in_batch` counts the trained tokens of every micro-batch of
the optimizer step (and of every rank with `average_tokens_across_devices`), so with all weights 1
the loss is TRL's loss. Weights are data (no gradient flows into them). Padding and
`padding_free=True` keep the weights aligned; `packing=True` is refused (TRL's packing keeps only
input_ids and labels), and truncation (`max_length`) cuts the weights where it cuts the labels.
"""
from __future__ import annotations

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

WEIGHTS = "token_weights"


class WeightedCollator:
    """TRL's language-modeling collator, plus `token_weights` padded (or concatenated) like the labels."""

    def __init__(self, base: DataCollatorForLanguageModeling, max_length: int | None = None,
                 keep_end: bool = False):
        self.base, self.max_length, self.keep_end = base, max_length, keep_end

    def __call__(self, examples: list[dict]) -> dict:
        weights = []
        for ex in examples:
            n = len(ex["input_ids"])
            w = torch.as_tensor(ex[WEIGHTS], dtype=torch.float32)
            if len(w) > n and self.max_length is not None:  # the row was truncated by TRL's preparation
                w = w[-n:] if self.keep_end else w[:n]
            if len(w) != n:
                raise ValueError(f"a row has {len(w)} {WEIGHTS} for {n} input_ids")
            weights.append(w)
        batch = self.base([{k: v for k, v in ex.items() if k != WEIGHTS} for ex in examples])
        length = batch["labels"].shape[1]
        if self.base.padding_free:
            weights = [torch.cat(weights)]
        batch[WEIGHTS] = torch.stack([torch.nn.functional.pad(w, (0, length - len(w))) for w in weights])
        return batch


class PearSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose per-token NLL is multiplied by each row's `token_weights`."""

    def __init__(self, *args, data_collator=None, **kwargs):
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None and config.packing:
            raise ValueError("packing=True keeps only input_ids and labels, so the token weights would be lost; "
                             "use padding_free=True to train without padding")
        super().__init__(*args, data_collator=data_collator, **kwargs)
        if data_collator is None:
            self.data_collator = WeightedCollator(self.data_collator, self.args.max_length,
                                                  keep_end=self.args.truncation_mode == "keep_end")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHTS not in self._signature_columns:  # keep the column through remove_unused_columns
            self._signature_columns = [*self._signature_columns, WEIGHTS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        weights = inputs.pop(WEIGHTS)
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)  # log_probs (B, L-1): 0 off the labels
        w = weights[:, 1:].to(outputs.log_probs.device, outputs.log_probs.dtype)  # weight of each predicted token
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(w * outputs.log_probs).sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages the gradients
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            mask = outputs.label_mask
            n = self.accelerator.gather_for_metrics(mask.sum()).sum()
            w_sum = self.accelerator.gather_for_metrics((w * mask).sum()).sum()
            correct = self.accelerator.gather_for_metrics(outputs.is_top1.sum()).sum()
            self._metrics[mode]["mean_weight"].append((w_sum / n).item() if n > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
        return (loss, outputs) if return_outputs else loss
