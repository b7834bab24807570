"""Stage 1, linguistic continued pretraining (paper section 3.1).

Next-token training of a Qwen-2.5 / Llama-3 style LLM on a sign-language text corpus:
plain text (books, web pages) packed into fixed-length blocks, and gloss-text pairs, which
are put in the same chat format the VLT prompt uses (glosses in the user turn, the sentence
as the answer, loss on the answer only), so the LLM learns the sign grammar in exactly the
place where the visual tokens will later sit.

    python train_cpt.py --corpus=corpus.jsonl --init=Qwen2.5-7B-Instruct --out=out/cpt --lora_r=64
    python train_cpt.py --corpus=corpus.jsonl --out=out/cpt          # fresh tiny model + tokenizer (the demo)

The output folder is a Hugging Face LLM folder (LoRA merged) that `transformers` loads too.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from data import build_chat_example, collate_vlt, pack_blocks, read_corpus, system_prompt
from losses import lm_loss
from model import LLM, LLMConfig, apply_lora
from tokenizer import Tokenizer
from training import (TrainConfig, check_out, cli, fit, make_optimizer, parse_config, seed_everything,
                      setup_distributed, trainable_in_fp32)


@dataclass
class CPTConfig(TrainConfig):
    corpus: str = ""                 # jsonl: {"text"} plain text, {"gloss", "text"} gloss-text pairs
    init: str = ""                   # Hugging Face LLM folder to continue; empty: a fresh model (below)
    out: str = "out/cpt"
    language: str = "German"         # of the pairs' answers, for the system prompt (paper Tab. F/G)
    block_size: int = 512            # tokens per packed block of plain text
    gloss_repeat: int = 1            # each gloss of a pair repeated 1..n times at random (a sign spans 1-2 visual tokens)
    lora_r: int = 0                  # > 0: LoRA on the LLM instead of full training (merged when saved)
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    dtype: str = "float32"           # frozen weights of a loaded --init and the saved folder (bf16 for big models);
                                     # what trains is fp32 in memory (master weights) either way
    # a fresh model (no --init): the shape of a tiny Qwen2 and a tokenizer trained on the corpus
    vocab: str = "wordlevel"         # wordlevel | bpe
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    lr: float = 2e-5
    weight_decay: float = 0.0


class CorpusDataset(torch.utils.data.Dataset):
    """Packed plain-text blocks (loss everywhere) followed by gloss-text chat examples (loss on
    the answer). Gloss repetition is drawn per (seed, epoch, index), so runs are reproducible."""

    def __init__(self, tok, rows, block_size, language, gloss_repeat, seed):
        plain = [r["text"] for r in rows if "gloss" not in r]
        self.blocks = pack_blocks(tok, plain, block_size) if plain else torch.zeros(0, block_size, dtype=torch.long)
        self.pairs = [r for r in rows if "gloss" in r]
        self.tok, self.system, self.repeat, self.seed, self.epoch = tok, system_prompt(language), gloss_repeat, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.blocks) + len(self.pairs)

    def __getitem__(self, i):
        if i < len(self.blocks):
            ids = self.blocks[i].tolist()
            return {"input_ids": ids, "labels": ids, "visual_start": None}
        pair = self.pairs[i - len(self.blocks)]
        glosses = pair["gloss"].split()
        if self.repeat > 1:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            glosses = [g for g in glosses for _ in range(rng.integers(1, self.repeat + 1))]
        return build_chat_example(self.tok, self.system, " ".join(glosses), answer=pair["text"])


def fresh_model(cfg: CPTConfig, rows) -> tuple:
    """A tokenizer trained on the corpus (plus the prompt's own words) and a random tiny Qwen2."""
    texts = [r["text"] for r in rows] + [r["gloss"] for r in rows if "gloss" in r] + [system_prompt(cfg.language)]
    tok = Tokenizer.train(texts, vocab_size=cfg.vocab_size, kind=cfg.vocab)
    config = LLMConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=tok.eos_token_ids, bos_token_id=None)
    return tok, LLM(config)


def main(argv):
    cfg = parse_config(CPTConfig, argv)
    if not cfg.corpus:
        raise ValueError("--corpus is required: a jsonl file of {\"text\"} or {\"gloss\", \"text\"} rows")
    check_out(cfg.out, "cpt", corpus=cfg.corpus, init=cfg.init)
    dist = setup_distributed(cfg.device)
    seed_everything(cfg.seed)  # the same fresh weights on every rank

    rows = read_corpus(cfg.corpus)
    if cfg.init:
        tok = Tokenizer.from_pretrained(cfg.init)
        llm = LLM.from_pretrained(cfg.init, dtype=getattr(torch, cfg.dtype))
    else:
        tok, llm = fresh_model(cfg, rows)
    tok.check_fits(llm.config.vocab_size, cfg.init or "the fresh model")
    dataset = CorpusDataset(tok, rows, cfg.block_size, cfg.language, cfg.gloss_repeat, cfg.seed)
    dist.log(f"corpus {cfg.corpus}: {len(dataset.blocks)} blocks of {cfg.block_size} tokens, "
             f"{len(dataset.pairs)} gloss-text pairs; LLM {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M params")

    if cfg.lora_r > 0:
        llm.requires_grad_(False)
        apply_lora(llm, tuple(cfg.lora_targets.split(",")), cfg.lora_r, cfg.lora_alpha)
    trainable_in_fp32(llm)
    optimizer = make_optimizer(llm, cfg.lr, cfg.weight_decay)

    def train_step(model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        loss, n = lm_loss(logits, batch["labels"])
        return loss * n, n

    def save(folder):  # a Hugging Face folder; LoRA is merged into the weights on the way out
        llm.save_pretrained(folder, tokenizer=tok, dtype=cfg.dtype)

    fit(llm, train_step, dataset, optimizer, cfg, dist, unit="tokens", save_fn=save, stage="cpt",
        collate_fn=lambda ex: collate_vlt(ex, tok.pad_token_id))
    dist.log(f"saved {cfg.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
