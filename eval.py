"""Evaluation of LLaVA-SLT (paper section 4): BLEU-1..4 and ROUGE-L, then the CLI.

Metrics are scored as the field scores them, so numbers compare with
the paper's tables:
- BLEU-n: sacrebleu corpus BLEU with tokenize="none" and max_ngram_order=n, i.e. the
  cumulative BLEU-1..4 that signjoey reports, on the raw strings (no lowercasing, no
  punctuation stripping; the text is already tokenized, words separated by spaces).
- ROUGE-L: per-sentence LCS F-score with beta = 1.2, averaged over sentences, x 100
  (the formula of signjoey's / the original ROUGE's calc_score).
- Chinese (level="char"): spaces removed, every character a token, before both metrics;
  level="char_published": the same, but ASCII runs stay glued to the character before them.
"""

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
from sacrebleu.metrics import BLEU
from tqdm import tqdm

from checkpoint import record_eval
from cli import cli, parse_config, resolve_device
from data import ClipDataset, VideoTransform, build_chat_example, collate_clips, collate_vlt, sample_indices
from errors import UserError
from hf import checkpoint_folder, read_json
from model import LLM, Connector, LLaVASLT, LLMConfig
from readers import language_of, load_rows, read_sentences, read_video
from tokenizer import Tokenizer
from training import seed_everything
from vision import VCPConfig, VCPModel

ROUGE_BETA = 1.2
LEVELS = ("word", "char", "char_published")  # score's tokenisations: words, characters, sltbaselines' characters


# ----------------------------------------------------------------------------- metrics

def _char_level(sentence: str) -> str:
    """'我 爱 北京。' -> '我 爱 北 京 。' : drop all whitespace, one token per character."""
    return " ".join("".join(sentence.split()))


def _char_published(sentence: str) -> str:
    """'我有3个 几?' -> '我 有3 个 几?' : all whitespace dropped, one token per character, except that
    a run of ASCII characters (digits, punctuation, Latin letters) is glued to the character before
    it (a run opening the sentence is a token of its own): how sltbaselines splits CSL-Daily."""
    return " ".join(re.findall(r"[^\x00-\x7f][\x00-\x7f]*|[\x00-\x7f]+", "".join(sentence.split())))


def _lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)  # one DP row over b, kept short
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: str, ref: str, beta: float = ROUGE_BETA) -> float:
    """Sentence ROUGE-L F-score in [0, 1]: ((1 + beta^2) R P) / (R + beta^2 P), LCS on tokens.

    An empty hypothesis or reference scores 0.
    """
    h, r = hyp.split(), ref.split()
    if not h or not r:
        return 0.0
    lcs = _lcs_length(h, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(h), lcs / len(r)
    return (1 + beta ** 2) * rec * prec / (rec + beta ** 2 * prec)


def bleu_signature() -> str:
    """sacrebleu's signature of the BLEU computed here (its tokenizer, smoothing and version),
    printed beside every score so a table says how it was computed."""
    bleu = BLEU(tokenize="none", max_ngram_order=4, force=True)
    bleu.corpus_score(["a"], [["a"]])  # sacrebleu knows the reference count only after a score
    return bleu.get_signature().format()


def score(hyps, refs, level: str = "word") -> dict:
    """Corpus BLEU-1..4 and mean sentence ROUGE-L of hypotheses against one reference each.

    hyps, refs: lists of raw strings, hyps[i] translating refs[i].
    level: "word" (tokens are the space-separated words, e.g. Phoenix-2014T) or "char"
    (spaces removed and every character a token, e.g. CSL-Daily) or "char_published" (_char_published).
    Returns {"bleu1", "bleu2", "bleu3", "bleu4", "rouge"}, each in [0, 100].
    """
    if level not in LEVELS:
        raise UserError(f"score: level={level!r}; use 'word', 'char' or 'char_published'")
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise UserError(f"score: {len(hyps)} hypotheses but {len(refs)} references; give one hypothesis per reference")
    if not refs:
        raise UserError("score: no sentences to score (empty lists)")
    for name, sentences in (("hypothesis", hyps), ("reference", refs)):
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"score: {name} {i} is {type(s).__name__}, not str")
    if level != "word":  # the same tokenisation on both sides
        split = _char_level if level == "char" else _char_published
        hyps, refs = [split(s) for s in hyps], [split(s) for s in refs]

    out = {}
    for n in range(1, 5):
        # force=True only silences sacrebleu's "tokenized period" warning: sign-language
        # references are tokenized on purpose (Phoenix: "... morgen ."), the score is unchanged
        bleu = BLEU(tokenize="none", max_ngram_order=n, force=True)
        out[f"bleu{n}"] = bleu.corpus_score(hyps, [refs]).score
    out["rouge"] = 100.0 * sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / len(refs)
    return out


# --- CLI
# Translate one video, or a whole split with beam search and score it:
#   python eval.py --checkpoint out/vlt --video clip.mp4
#   python eval.py --checkpoint out/vlt --data DIR --split test [--num_beams=4]
# --text_only=true: the LLM answers the same prompt with no visual tokens (the language prior);
# --untrained=true: the same architecture with fresh random weights (a floor for the table).



@dataclass
class EvalConfig:
    checkpoint: str = ""             # a LLaVA-SLT folder (train_vlt.py)
    video: str = ""                  # one mp4 / frame folder: print its translation
    data: str = ""                   # or a dataset and split: translate, score, write predictions.jsonl
    split: str = "test"
    num_beams: int = 4
    length_penalty: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 16
    num_workers: int = 0
    text_only: bool = False          # no visual tokens: what the language prior alone gives
    untrained: bool = False          # random weights of the same architecture
    predictions: str = ""            # default: <checkpoint>/predictions_<split>.jsonl
    hypotheses: str = ""             # score a file instead (one sentence a line, or a predictions .jsonl) ...
    references: str = ""             # ... against this one (default: the .jsonl's own references)
    level: str = ""                  # word | char | char_published; default: the dataset's (word for a file)
    json: str = ""                   # also write the scores here
    device: str = "auto"
    dtype: str = "auto"              # weights and activations: auto = bfloat16 on CUDA, float32 on CPU
    seed: int = 0


def load_untrained(folder: str, device) -> LLaVASLT:
    """The checkpoint's architecture with fresh weights (the tokenizer is kept)."""
    config = LLaVASLT.read_config(folder)
    llm = LLM(LLMConfig.from_hf(read_json(os.path.join(config["llm"], "config.json"))))
    visual = VCPModel(dataclasses.replace(VCPConfig.from_dict(read_json(os.path.join(config["visual"], "config.json"))),
                                          vit_path=""))
    model = LLaVASLT(llm, Connector(config["visual_dim"], llm.config.hidden_size, config["connector"]), visual,
                     config["visual_tokens"])
    model.config = config
    return model.to(device).eval()


@torch.no_grad()
def translate(model: LLaVASLT, tok, system, batch, config: EvalConfig, device) -> list:
    """A collated batch of clips (frames, or word features computed before) -> the decoded sentences."""
    if config.text_only:
        B = len(batch["ids"])
        feats = torch.zeros(B, 0, model.connector_dims()[0], device=device, dtype=model.connector_dtype())
        mask = torch.zeros(B, 0, dtype=torch.bool, device=device)
    elif "word_features" in batch:  # the frozen encoder's cached features (train_vlt's validation)
        feats = batch["word_features"].to(device, model.connector_dtype())
        mask = batch["word_mask"].to(device)
    else:
        frames = batch["frames"].to(device, model.connector_dtype())
        feats, mask = model.visual_features(frames, batch["frame_mask"].to(device))
    limit = model.llm.config.max_position_embeddings - config.max_new_tokens  # the answer needs its positions too
    examples = [build_chat_example(tok, system, int(n), max_length=limit, clip=clip)
                for n, clip in zip(mask.sum(1).tolist(), batch["ids"])]
    prompt = {k: v.to(device) for k, v in collate_vlt(examples, tok.pad_token_id, padding_side="left").items()}
    new = model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["slot_mask"], feats, mask,
                         max_new_tokens=config.max_new_tokens, num_beams=config.num_beams,
                         length_penalty=config.length_penalty, eos_token_id=tok.eos_token_ids,
                         pad_token_id=tok.pad_token_id)
    return [tok.decode(row).strip() for row in new.tolist()]


def print_scores(scores: dict, what: str):
    print(what)
    print(" | ".join(f"{k.upper():>6}" for k in scores))
    print(" | ".join(f"{v:6.2f}" for v in scores.values()))
    print(f"BLEU signature: {bleu_signature()}")


def main(argv):
    config = parse_config(EvalConfig, argv)
    if config.level and config.level not in LEVELS:  # before any model is loaded
        raise UserError(f"--level={config.level}: expected word (Phoenix-2014T), char or char_published (CSL-Daily)")
    if config.hypotheses:  # any system's outputs, scored exactly as a split is
        hyps = read_sentences(config.hypotheses, "hypothesis")
        references = config.references or config.hypotheses
        refs = read_sentences(references, "reference")
        if len(hyps) != len(refs):
            raise UserError(f"{config.hypotheses} has {len(hyps)} sentences, {references} {len(refs)}; "
                            "give one hypothesis per reference, in the same order")
        level = config.level or "word"
        print_scores(score(hyps, refs, level), f"{len(hyps)} sentences, {level}-level, both files as they are")
        return
    if not config.checkpoint:
        raise UserError("--checkpoint is required: a LLaVA-SLT folder written by train_vlt.py")
    if bool(config.video) == bool(config.data):
        raise UserError("give --video (one clip) or --data with --split (a whole split)")
    device = resolve_device(config.device)
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype={config.dtype}: expected auto, float32, bfloat16 or float16")
    # a 7B LLM in fp32 needs 28 GB and runs at half the speed; bf16 is what it was trained in
    dtype = getattr(torch, "bfloat16" if device.type == "cuda" else "float32") if config.dtype == "auto" \
        else getattr(torch, config.dtype)
    # the outputs are checked before the work, not after translating a whole split
    predictions = config.predictions or os.path.join(checkpoint_folder(config.checkpoint),
                                                     f"predictions_{config.split}.jsonl")
    for flag, path in (("--predictions", predictions if config.data else ""), ("--json", config.json)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))
                     or not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
                     or (os.path.exists(path) and not os.access(path, os.W_OK))):
            raise UserError(f"{flag}={path}: cannot write a file there (a folder, a missing or read-only "
                            "parent folder); give a file path")
    seed_everything(config.seed)
    model = (load_untrained(config.checkpoint, device) if config.untrained
             else LLaVASLT.load(config.checkpoint, VCPModel.load, dtype=dtype, device=device)).to(device, dtype)
    tok = Tokenizer.from_pretrained(model.config["llm"])
    system = model.config["system"]
    vc = model.visual_encoder.config
    transform = VideoTransform(vc.image_size, vc.resize, train=False)

    if config.video:
        frames = transform(read_video(config.video, sample=lambda n: sample_indices(n, vc.max_frames, vc.stride)))
        batch = collate_clips([{"id": config.video, "frames": frames, "text": "", "index": 0}])
        print(translate(model, tok, system, batch, config, device)[0])
        return

    rows = load_rows(config.data, config.split)
    level = config.level or language_of(config.data)[1]
    dataset = ClipDataset(rows, transform, max_frames=vc.max_frames, stride=vc.stride, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, collate_fn=collate_clips,
                                         num_workers=config.num_workers)
    hyps, refs, ids = [], [], []
    for batch in tqdm(loader, desc=f"translating {config.split}", total=math.ceil(len(dataset) / config.batch_size),
                      dynamic_ncols=True, disable=None):
        hyps += translate(model, tok, system, batch, config, device)
        refs += batch["texts"]
        ids += batch["ids"]
    scores = score(hyps, refs, level)
    path = predictions
    with open(path, "w", encoding="utf-8") as f:
        for i, h, r in zip(ids, hyps, refs):
            f.write(json.dumps({"id": i, "hypothesis": h, "reference": r}, ensure_ascii=False) + "\n")
    print_scores(scores, f"{config.split}: {len(hyps)} clips, {level}-level, references as the dataset gives them")
    print(f"predictions: {path}")
    if config.json:
        with open(config.json, "w") as f:
            json.dump(scores, f, indent=2)
    record_eval(config, [path, config.json], device, dtype)   # <file stem>.run.json beside each: how it was made


if __name__ == "__main__":
    cli(main, sys.argv[1:])
