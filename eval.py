"""Evaluation of LLaVA-SLT (paper section 4): BLEU-1..4 and ROUGE-L, then the CLI.

Metrics are scored as the field scores them (DESIGN.md section 6), so numbers compare with
the paper's tables:
- BLEU-n: sacrebleu corpus BLEU with tokenize="none" and max_ngram_order=n, i.e. the
  cumulative BLEU-1..4 that signjoey reports, on the raw strings (no lowercasing, no
  punctuation stripping; the text is already tokenized, words separated by spaces).
- ROUGE-L: per-sentence LCS F-score with beta = 1.2, averaged over sentences, x 100
  (the formula of signjoey's / the original ROUGE's calc_score).
- Chinese (level="char"): spaces removed, every character a token, before both metrics.
"""

from sacrebleu.metrics import BLEU

ROUGE_BETA = 1.2


# ----------------------------------------------------------------------------- metrics

def _char_level(sentence: str) -> str:
    """'我 爱 北京。' -> '我 爱 北 京 。' : drop all whitespace, one token per character."""
    return " ".join("".join(sentence.split()))


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


def score(hyps, refs, level: str = "word") -> dict:
    """Corpus BLEU-1..4 and mean sentence ROUGE-L of hypotheses against one reference each.

    hyps, refs: lists of raw strings, hyps[i] translating refs[i].
    level: "word" (tokens are the space-separated words, e.g. Phoenix-2014T) or "char"
    (spaces removed and every character a token, e.g. CSL-Daily).
    Returns {"bleu1", "bleu2", "bleu3", "bleu4", "rouge"}, each in [0, 100].
    """
    if level not in ("word", "char"):
        raise ValueError(f"score: level={level!r}; use 'word' or 'char'")
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"score: {len(hyps)} hypotheses but {len(refs)} references; give one hypothesis per reference")
    if not refs:
        raise ValueError("score: no sentences to score (empty lists)")
    for name, sentences in (("hypothesis", hyps), ("reference", refs)):
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"score: {name} {i} is {type(s).__name__}, not str")
    if level == "char":
        hyps, refs = [_char_level(s) for s in hyps], [_char_level(s) for s in refs]

    out = {}
    for n in range(1, 5):
        bleu = BLEU(tokenize="none", max_ngram_order=n)
        out[f"bleu{n}"] = bleu.corpus_score(hyps, [refs]).score
    out["rouge"] = 100.0 * sum(rouge_l(h, r) for h, r in zip(hyps, refs)) / len(refs)
    return out


# --- CLI
