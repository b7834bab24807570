"""Tests for eval.py: the metrics (BLEU against sacrebleu, ROUGE-L against hand values)."""

import pytest
from sacrebleu.metrics import BLEU

from eval import rouge_l, score

HYPS = ["am montag gibt es nebel im westen .",
        "heute regen im norden",
        "Morgen sonne und wind im süden .",
        "es bleibt trocken"]
REFS = ["am montag gibt es starken nebel im westen .",
        "heute im norden regen und schnee .",
        "morgen sonne im süden .",
        "es bleibt meist trocken ."]


def _sacrebleu(hyps, refs, n):
    return BLEU(tokenize="none", max_ngram_order=n).corpus_score(hyps, [refs]).score


def test_bleu_equals_sacrebleu_called_directly():
    s = score(HYPS, REFS)
    assert set(s) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge"}
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(_sacrebleu(HYPS, REFS, n), abs=1e-9)
    # cumulative BLEU-n falls with n on imperfect output
    assert s["bleu1"] > s["bleu2"] > s["bleu3"] > s["bleu4"] > 0


def test_bleu1_by_hand_and_raw_strings():
    # "a b c d" vs "a b c e": 3 of 4 unigrams match, equal lengths (BP = 1) -> 75
    assert score(["a b c d"], ["a b c e"])["bleu1"] == pytest.approx(75.0)
    # no lowercasing: "Morgen" does not match "morgen"
    assert score(["Morgen regen"], ["morgen regen"])["bleu1"] == pytest.approx(50.0)
    # no tokenisation: "westen." is one token, not "westen" + "."
    assert score(["im westen."], ["im westen ."])["bleu1"] < 50.0
    perfect = score(REFS, REFS)
    assert all(perfect[k] == pytest.approx(100.0) for k in perfect)


def test_rouge_l_hand_values():
    # hyp "the cat sat on mat" (5) vs ref "the cat is on the mat" (6):
    #   LCS = "the cat on mat" = 4 -> P = 4/5, R = 4/6
    p, r = 4 / 5, 4 / 6
    assert rouge_l("the cat sat on mat", "the cat is on the mat") == pytest.approx(
        (1 + 1.2 ** 2) * r * p / (r + 1.2 ** 2 * p))
    # "a b c" vs "c b a": LCS = 1 ("a", "b" or "c") -> P = R = 1/3 -> F = 1/3
    assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)
    # "x y" vs "a b": LCS = 0 -> 0;   identical -> 1
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("a b c", "a b c") == pytest.approx(1.0)
    # beta weighs recall: a short precise hypothesis "a" vs "a b c d" (P = 1, R = 1/4)
    assert rouge_l("a", "a b c d") == pytest.approx(2.44 * 0.25 / (0.25 + 1.44))


def test_rouge_is_the_mean_over_sentences_x100():
    hyps, refs = ["the cat sat on mat", "a b c", "x y"], ["the cat is on the mat", "c b a", "a b"]
    p, r = 4 / 5, 4 / 6
    expected = 100 * ((1 + 1.44) * r * p / (r + 1.44 * p) + 1 / 3 + 0) / 3
    assert score(hyps, refs)["rouge"] == pytest.approx(expected)


def test_char_level_chinese():
    hyps = ["我 爱 北京", "今天 天气 好。"]
    refs = ["我爱北京天安门", "今天天气很好。"]
    s = score(hyps, refs, level="char")
    # spaces removed, one token per character
    char_h, char_r = ["我 爱 北 京", "今 天 天 气 好 。"], ["我 爱 北 京 天 安 门", "今 天 天 气 很 好 。"]
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(_sacrebleu(char_h, char_r, n), abs=1e-9)
    # "我爱北京" vs "我爱北京天安门": LCS 4, P = 1, R = 4/7
    # "今天天气好。" vs "今天天气很好。": LCS 6 (all but 很), P = 1, R = 6/7
    def f(p, r):
        return 2.44 * p * r / (r + 1.44 * p)

    assert s["rouge"] == pytest.approx(100 * (f(1, 4 / 7) + f(1, 6 / 7)) / 2)
    # word level on the same strings sees whole words: "北京" is one token there
    assert score(hyps, refs, level="word")["bleu1"] != s["bleu1"]


def test_empty_hypothesis_scores_zero_without_crash():
    s = score(["", "heute regen"], ["heute regen", "heute regen"])
    assert s["rouge"] == pytest.approx(50.0)
    for n in range(1, 5):
        assert s[f"bleu{n}"] == pytest.approx(_sacrebleu(["", "heute regen"], ["heute regen"] * 2, n))
    assert score([""], ["heute regen"]) == {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "rouge": 0.0}


def test_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no sentences"):
        score([], [])
    with pytest.raises(ValueError, match="level"):
        score(["a"], ["a"], level="token")
    with pytest.raises(TypeError, match="hypothesis 1 is NoneType"):
        score(["a", None], ["a", "b"])


def test_bleu_by_hand_with_a_brevity_penalty():
    """One sentence worked out on paper: 6 hypothesis words against 7 reference words, one
    wrong word at the end. Precisions 5/6, 4/5, 3/4, 2/3; brevity penalty exp(1 - 7/6)."""
    import math
    from eval import score
    s = score(["am montag regnet es im süden"], ["am montag regnet es im norden stark"])
    bp = math.exp(1 - 7 / 6)
    assert s["bleu1"] == pytest.approx(100 * bp * 5 / 6, abs=1e-9)
    assert s["bleu2"] == pytest.approx(100 * bp * (5 / 6 * 4 / 5) ** (1 / 2), abs=1e-9)
    assert s["bleu4"] == pytest.approx(100 * bp * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** (1 / 4), abs=1e-9)
    assert s["bleu4"] == pytest.approx(64.3187, abs=1e-4)


# ---------------------------------------------------------------------------- scoring files

def _main_out(argv, capsys):
    from eval import main
    main(argv)
    return capsys.readouterr().out


def test_scoring_files_equals_scoring_a_split(tmp_path, capsys):
    import json
    from eval import bleu_signature
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    ref.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    out = _main_out([f"--hypotheses={hyp}", f"--references={ref}"], capsys)
    s = score(HYPS, REFS)
    assert " | ".join(f"{v:6.2f}" for v in s.values()) in out and "4 sentences, word-level" in out
    sig = bleu_signature()
    assert f"BLEU signature: {sig}" in out and "tok:none" in sig and "smooth:exp" in sig and "version:2." in sig
    # eval.py's own predictions file holds both sides
    preds = tmp_path / "predictions_test.jsonl"
    preds.write_text("".join(json.dumps({"id": str(i), "hypothesis": h, "reference": r}) + "\n"
                             for i, (h, r) in enumerate(zip(HYPS, REFS))), encoding="utf-8")
    assert " | ".join(f"{v:6.2f}" for v in s.values()) in _main_out([f"--hypotheses={preds}"], capsys)
    # characters: the same normalisation on both sides
    zh_h, zh_r = tmp_path / "zh_h.txt", tmp_path / "zh_r.txt"
    zh_h.write_text("今天 北京 下雨 。\n", encoding="utf-8")
    zh_r.write_text("今天北京下雪。\n", encoding="utf-8")
    out = _main_out([f"--hypotheses={zh_h}", f"--references={zh_r}", "--level=char"], capsys)
    assert f"{score(['今天北京下雨。'], ['今天北京下雪。'], 'char')['bleu1']:6.2f}" in out
    assert f"{100 * 6 / 7:6.2f}" in out.splitlines()[2]   # BLEU-1: 6 of 7 characters match (雨 vs 雪)


def test_scoring_files_errors_are_one_line(tmp_path, capsys):
    from cli import cli
    from eval import main
    hyp, ref, empty, bad = (tmp_path / n for n in ("hyp.txt", "ref.txt", "empty.txt", "latin1.txt"))
    hyp.write_text("a b\nc d\n", encoding="utf-8")
    ref.write_text("a b\n", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    bad.write_bytes("gr\xfc\xdfe\n".encode("latin-1"))
    for argv, match in (([f"--hypotheses={hyp}", f"--references={ref}"], "has 2 sentences, .*ref.txt 1"),
                        ([f"--hypotheses={empty}", f"--references={ref}"], "empty.txt: empty"),
                        ([f"--hypotheses={bad}", f"--references={ref}"], "latin1.txt line 1: not UTF-8"),
                        ([f"--hypotheses={hyp}", f"--references={tmp_path / 'nope.txt'}"], "nope.txt: not found"),
                        ([f"--hypotheses={hyp}", f"--references={hyp}", "--level=chars"], "--level=chars")):
        with pytest.raises(SystemExit):
            cli(main, argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and __import__("re").search(match, err), err


# ---------------------------------------------------------------------------- char_published

def test_char_published_glues_ascii_runs_to_the_character_before():
    from eval import _char_published
    assert _char_published("我有3个 几?") == "我 有3 个 几?"
    # a run opening the sentence is its own token; full-width punctuation stays a character
    assert _char_published("OK, 我 12点到。") == "OK, 我12 点 到 。"
    assert _char_published("  ") == "" and _char_published("abc") == "abc"


def test_char_published_scores_its_own_tokens_on_both_sides():
    hyps, refs = ["我有5个苹果?", "你 好 吗 ?"], ["我有3个苹果?", "你好吗?"]
    # char: 我 有 5 个 苹 果 ? / 我 有 3 个 苹 果 ?     char_published: 我 有5 个 苹 果? / 我 有3 个 苹 果?
    char_h, char_r = ["我 有 5 个 苹 果 ?", "你 好 吗 ?"], ["我 有 3 个 苹 果 ?", "你 好 吗 ?"]
    pub_h, pub_r = ["我 有5 个 苹 果?", "你 好 吗?"], ["我 有3 个 苹 果?", "你 好 吗?"]
    char, pub = score(hyps, refs, "char"), score(hyps, refs, "char_published")
    for n in range(1, 5):
        assert char[f"bleu{n}"] == pytest.approx(_sacrebleu(char_h, char_r, n), abs=1e-9)
        assert pub[f"bleu{n}"] == pytest.approx(_sacrebleu(pub_h, pub_r, n), abs=1e-9)
    # by hand, BLEU-1: char 10 of 11 tokens match, char_published 7 of 8 (有5 is not 有3)
    assert (char["bleu1"], pub["bleu1"]) == (pytest.approx(100 * 10 / 11), pytest.approx(100 * 7 / 8))
    # BLEU-4, n-gram matches char 10/11, 7/9, 4/7, 2/5; char_published 7/8, 4/6, 2/4 and 0/2, which
    # sacrebleu's exp smoothing counts as 1 / (2 * 2); equal lengths, no brevity penalty
    assert char["bleu4"] == pytest.approx(100 * (10 / 11 * 7 / 9 * 4 / 7 * 2 / 5) ** 0.25, abs=1e-9)
    assert pub["bleu4"] == pytest.approx(100 * (7 / 8 * 4 / 6 * 2 / 4 * 1 / 4) ** 0.25, abs=1e-9)
    assert (round(char["bleu4"], 2), round(pub["bleu4"], 2)) == (63.40, 51.96)
    # ROUGE-L: LCS 6 of 7 vs 4 of 5 tokens on the first sentence, the second identical
    assert pub["rouge"] == pytest.approx(100 * (4 / 5 + 1) / 2) and char["rouge"] == pytest.approx(100 * (6 / 7 + 1) / 2)


def test_char_published_from_the_command_line(tmp_path, capsys):
    hyp, ref = tmp_path / "hyp.txt", tmp_path / "ref.txt"
    hyp.write_text("我有5个苹果?\n你 好 吗 ?\n", encoding="utf-8")
    ref.write_text("我有3个苹果?\n你好吗?\n", encoding="utf-8")
    out = _main_out([f"--hypotheses={hyp}", f"--references={ref}", "--level=char_published"], capsys)
    assert out.splitlines()[0] == "2 sentences, char_published-level, both files as they are"
    assert out.splitlines()[2] == " 87.50 |  76.38 |  66.32 |  51.96 |  90.00"
    assert out.splitlines()[3].startswith("BLEU signature: nrefs:1|") and "tok:none" in out.splitlines()[3]
