"""Stage 1, linguistic continued pretraining (paper section 3.1).

Next-token training of a Qwen-2.5 / Llama-3 style LLM on a sign-language text corpus: plain
text (books, web pages) packed into fixed-length blocks, and gloss-text pairs in the chat
format of the VLT prompt (glosses in the user turn, loss on the sentence only), so the LLM
learns the sign grammar where the visual tokens will later sit. The output is a Hugging Face
LLM folder (LoRA merged) that `transformers` loads too.

    python train_cpt.py --corpus=corpus.jsonl --init=Qwen2.5-7B-Instruct --out=out/cpt --lora_r=64
    python train_cpt.py --corpus=corpus.jsonl --out=out/cpt          # fresh tiny model + tokenizer (the demo)
"""

import sys
from dataclasses import dataclass

import torch

from checkpoint import check_out
from cli import cli, parse_config, setup_distributed
from data import CorpusDataset, collate_vlt, system_prompt
from errors import UserError
from losses import lm_loss
from model import LLM, LLMConfig, apply_lora
from readers import read_corpus
from tokenizer import Tokenizer
from training import TrainConfig, fit, make_optimizer, parameter_counts, seed_everything, trainable_in_fp32


@dataclass
class CPTConfig(TrainConfig):
    corpus: str = ""                 # jsonl: {"text"} plain text, {"gloss", "text"} gloss-text pairs
    init: str = ""                   # Hugging Face LLM folder to continue; empty: a fresh model (below)
    out: str = "out/cpt"
    language: str = "German"         # of the pairs' answers, for the system prompt (paper Tab. F/G)
    block_size: int = 512            # tokens per packed block of plain text
    gloss_repeat: int = 1            # each gloss of a pair repeated 1..n times at random (a sign: 1-2 visual tokens)
    lora_r: int = 0                  # > 0: LoRA on the LLM instead of full training (merged when saved)
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    dtype: str = "float32"           # frozen --init weights and the saved folder (bf16: big models); training is fp32
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


def fresh_model(config: CPTConfig, rows) -> tuple:
    """A tokenizer trained on the corpus (plus the prompt's own words) and a random tiny Qwen2."""
    texts = [r["text"] for r in rows] + [r["gloss"] for r in rows if "gloss" in r] + [system_prompt(config.language)]
    tok = Tokenizer.train(texts, vocab_size=config.vocab_size, kind=config.vocab)
    return tok, LLM(LLMConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=config.hidden_size,
                              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                              num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                              max_position_embeddings=4096, tie_word_embeddings=True,
                              eos_token_id=tok.eos_token_ids, bos_token_id=None))


def main(argv):
    config = parse_config(CPTConfig, argv)
    if not config.corpus:
        raise UserError("--corpus is required: a jsonl file of {\"text\"} or {\"gloss\", \"text\"} rows")
    check_out(config.out, "cpt", corpus=config.corpus, init=config.init)
    dist = setup_distributed(config.device)
    seed_everything(config.seed)  # the same fresh weights on every rank

    rows = read_corpus(config.corpus)
    if config.init:
        tok = Tokenizer.from_pretrained(config.init)
        llm = LLM.from_pretrained(config.init, dtype=getattr(torch, config.dtype))
    else:
        tok, llm = fresh_model(config, rows)
    tok.check_fits(llm.config.vocab_size, config.init or "the fresh model")
    dataset = CorpusDataset(tok, rows, config.block_size, config.language, config.gloss_repeat, config.seed)
    dist.log(f"corpus {config.corpus}: {len(dataset.blocks)} blocks of {config.block_size} tokens, "
             f"{len(dataset.pairs)} gloss-text pairs; LLM {sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M params")

    if config.lora_r > 0:
        llm.requires_grad_(False)
        apply_lora(llm, tuple(config.lora_targets.split(",")), config.lora_r, config.lora_alpha)
    dist.log(parameter_counts(llm, {"LLM": ""}))
    trainable_in_fp32(llm)
    optimizer = make_optimizer(llm, config.lr, config.weight_decay)

    def train_step(model, batch):
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
        loss, n = lm_loss(logits, batch["labels"])
        return loss * n, n

    # the folder is a Hugging Face folder: LoRA is merged into the weights on the way out
    fit(llm, train_step, dataset, optimizer, config, dist, unit="tokens", stage="cpt",
        save_fn=lambda folder: llm.save_pretrained(folder, tokenizer=tok, dtype=config.dtype),
        collate_fn=lambda ex: collate_vlt(ex, tok.pad_token_id))
    dist.log(f"saved {config.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
