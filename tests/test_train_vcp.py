"""VCP's exact contrastive accumulation (train_vcp.grad_cache_window, GradCache): --grad_accum=k
is one contrastive batch of k x batch_size clips (every window's clip is every other clip's
negative), on one process and across DDP ranks.

- the window's gradients equal one graph over the whole window, with dropout on (the RNG is
  replayed in the second pass; without the replay the test fails);
- with dropout off they equal one forward of the collated big batch (clips of different
  lengths: the word features of the micro-batches are padded as the big batch pads them);
- under bf16 autocast they are as close to the fp32 gradient as one bf16 graph is (fp32 cache);
- the script: --batch_size=2 --grad_accum=2 == --batch_size=4, and 2 processes x accumulation
  2 x batch 2 == batch 8 on one (weights after the steps, the logged losses, `negatives`).

Tiny shapes (the flags of tests/test_scripts.py): 32 px frames, ViT width 16 x 1 layer, encoder
width 32 with 1 local + 1 full layer; 16 synthetic clips; a random 1-layer LLM as the teacher.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import safetensors.torch
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf  # noqa: E402
import train_vcp  # noqa: E402
from cli import Dist, cli, parse_config  # noqa: E402
from data import ClipDataset, VideoTransform, collate_clips  # noqa: E402
from errors import UserError  # noqa: E402
from model import LLM, LLMConfig  # noqa: E402
from readers import load_rows  # noqa: E402
from synth import synthesize  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402
from training import autocast, seed_everything  # noqa: E402
from vision import load_text_encoder, text_encoder_from_llm, text_encoder_from_words  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models, one thread

FLAGS = ["--image_size=32", "--resize=32", "--stride=2", "--frame_pool=flat", "--vit_tuning=full", "--vit_dim=16",
         "--vit_layers=1", "--vit_heads=2", "--patch_size=8", "--dim=32", "--heads=2", "--local_layers=1",
         "--window=3", "--full_layers=1", "--clip_dim=32", "--logit_scale_init=30", "--lr=2e-3", "--log_every=1",
         "--seed=0", "--max_steps=2", "--device=cpu"]
# max_frames=20: every synthetic clip (>= 40 frames, stride 2) gives 20 frames -> 5 word features,
# so SignCL's mean over each rank's anchors averaged over ranks is the global mean, and with margin 2
# every anchor takes all its candidates whatever the draw (as test_scripts' DDP test)
SCRIPT_FLAGS = FLAGS + ["--max_frames=20", "--dropout=0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """16 synthetic clips and a teacher folder (a random 1-layer LLM with a word-level tokenizer)."""
    root = tmp_path_factory.mktemp("vcp_accum")
    data, llm = root / "data", root / "llm"
    synthesize(data, seed=0, n_train=16, n_dev=0, n_test=0, n_corpus=0, workers=1, progress=False)
    tok = Tokenizer.train([r["text"] for r in load_rows(str(data), "train")], kind="wordlevel")
    torch.manual_seed(0)
    model = LLM(LLMConfig(vocab_size=tok.backend.get_vocab_size(), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, dtype="float32"))
    torch.nn.init.normal_(model.model.embed_tokens.weight)
    model.save_pretrained(str(llm), tokenizer=tok)
    return data, llm


def parts(setup, dropout: float, max_frames: int = 32):
    """The script's model, clips and its two functions (encode, loss_of), built as main builds them."""
    data, llm = setup
    config = parse_config(train_vcp.VCPTrainConfig, FLAGS + [f"--dropout={dropout}", f"--max_frames={max_frames}"])
    rows = load_rows(str(data), "train")
    teacher = text_encoder_from_llm(str(llm), train_vcp.LANG_CODES.values())
    text_sentence = train_vcp.encode_sentences(teacher, [r["text"] for r in rows], "de_DE", "cpu")
    text_words = torch.tensor([len(r["text"].split()) for r in rows])
    seed_everything(0)
    model = train_vcp.build_model(config, teacher).train()
    clips = ClipDataset(rows, VideoTransform(size=32, resize=32, train=True), max_frames=max_frames, stride=2,
                        train=True)

    def encode(net, batch):
        return net(batch["frames"], batch["frame_mask"], text_sentence=text_sentence[batch["index"]])

    def loss_of(out, index):
        loss, _, logs = train_vcp.objective(out, text_words[index], config.signcl_weight)
        return loss, None, logs
    return model, clips, encode, loss_of


def grads(model) -> dict:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def worst(got: dict, ref: dict):
    """(max abs difference of any parameter's gradient, its name, the largest reference gradient).
    fp32: measured 4.5e-6 of 3.7 (the patch embedding's, a sum over every frame's patches, in another
    order); in fp64 7e-8 (the model's own fp32 steps); a missed factor or a wrong mask is >= 1e-3."""
    assert sorted(got) == sorted(ref) and len(ref) > 10
    diff, name = max((float((got[n] - ref[n]).abs().max()), n) for n in ref)
    return diff, name, max(float(g.abs().max()) for g in ref.values())


def window(model, encode, loss_of, micro, k, precision="fp32"):
    """train_vcp.grad_cache_window on the micro-batches `micro`; its gradients, divided by k (fit's
    step divides a window by grad_accum), and its loss and logs."""
    loss, count, logs, mode = train_vcp.grad_cache_window(encode, loss_of, model, iter(micro), None, k, Dist(),
                                                          precision, None, None)
    assert mode == "mean" and count.item() == 0
    return {n: g / k for n, g in grads(model).items()}, loss.item() / k, logs


def one_graph(model, encode, loss_of, micro, precision="fp32"):
    """The reference: every micro-batch's graph kept (each under fit's autocast), one loss over the
    window, one backward; -> (gradients, loss)."""
    outs = []
    for batch in micro:
        with autocast("cpu", precision):
            outs.append(encode(model, batch))
    loss, _, _ = loss_of(train_vcp.join(outs), torch.cat([b["index"] for b in micro]))
    loss.backward()
    return grads(model), loss.item()


# 3 micro-batches of 2 clips, of 16..32 frames each: each micro-batch is padded to its own longest
MICRO = [[0, 1], [2, 3], [4, 5]]


def test_window_gradients_equal_one_graph_over_the_window_with_dropout(setup, monkeypatch):
    model, clips, encode, loss_of = parts(setup, dropout=0.2)
    micro = [collate_clips([clips[i] for i in ids]) for ids in MICRO]
    assert len({int(b["lengths"].max()) for b in micro}) > 1          # micro-batches of different lengths
    torch.manual_seed(7)
    ref, loss = one_graph(model, encode, loss_of, micro)
    torch.manual_seed(7)
    got, got_loss, _ = window(model, encode, loss_of, micro, 3)
    diff, name, scale = worst(got, ref)
    assert diff < 1e-5 * scale, f"worst gradient difference {diff:.3g} at {name} (largest gradient {scale:.3g})"
    assert got_loss == pytest.approx(loss, rel=1e-6)
    # the test can tell: without the RNG replay the second pass draws other dropout masks
    monkeypatch.setattr(train_vcp, "set_rng_state", lambda state, device: None)
    torch.manual_seed(7)
    stale, _, _ = window(model, encode, loss_of, micro, 3)
    assert worst(stale, ref)[0] > 1e-3


def test_window_gradients_equal_the_big_batch(setup):
    model, clips, encode, loss_of = parts(setup, dropout=0.0)
    ids = [i for m in MICRO for i in m]
    big = collate_clips([clips[i] for i in ids])                       # padded to the longest of all 6
    torch.manual_seed(7)                       # SignCL's negatives: the same draws in both
    loss, _, logs = loss_of(encode(model, big), big["index"])
    loss.backward()
    ref = grads(model)
    torch.manual_seed(7)
    got, got_loss, got_logs = window(model, encode, loss_of, [collate_clips([clips[i] for i in m]) for m in MICRO], 3)
    diff, name, scale = worst(got, ref)
    assert diff < 1e-5 * scale, f"worst gradient difference {diff:.3g} at {name} (largest gradient {scale:.3g})"
    assert got_loss == pytest.approx(loss.item(), rel=1e-6)
    assert got_logs["signcl"] == pytest.approx(logs["signcl"].item(), rel=1e-6) and got_logs["signcl"] > 0.1


def test_window_under_bf16_autocast_is_as_close_to_the_fp32_gradient_as_one_bf16_graph(setup):
    """Both passes run under fit's autocast, the cached gradients are fp32. Measured (relative norm
    of the error over all parameters): the window 1.5e-2, one bf16 graph 1.2e-2."""
    model, clips, encode, loss_of = parts(setup, dropout=0.0)
    micro = [collate_clips([clips[i] for i in ids]) for ids in MICRO]

    def error(got, ref):  # |got - ref| / |ref|, all parameters' gradients as one vector
        diff = sum((got[n] - ref[n]).norm() ** 2 for n in ref)
        return float((diff / sum(r.norm() ** 2 for r in ref.values())).sqrt())
    torch.manual_seed(7)
    exact, _ = one_graph(model, encode, loss_of, micro, "fp32")
    torch.manual_seed(7)
    plain, _ = one_graph(model, encode, loss_of, micro, "bf16")
    torch.manual_seed(7)
    got, _, _ = window(model, encode, loss_of, micro, 3, "bf16")
    assert all(g.dtype == torch.float32 for g in got.values())
    assert 1e-3 < error(got, exact) < 2 * error(plain, exact), (error(got, exact), error(plain, exact))


# ============================================================================ the script

def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def assert_same_run(got, ref, atol):
    """The weights after the steps, the logged losses and the gradient norms of two runs. A step
    is ~lr (2e-3) whatever the gradient's size (Adam, and clipping at 1): a gradient off by a
    constant factor shows in grad_norm only, rounding in a tiny gradient element in the weights."""
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(got, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    assert sorted(a) == sorted(b)
    diff, name = max((float((a[k] - b[k]).abs().max()), k) for k in a)
    assert diff < atol, f"worst weight difference {diff:.3g} at {name}"
    m, r = metrics(got), metrics(ref)
    assert [x["step"] for x in m] == [1, 2] and len({x["loss"] for x in r}) == 2
    for key in ("loss", "clip", "signcl", "grad_norm", "negatives"):
        torch.testing.assert_close(torch.tensor([x[key] for x in m]), torch.tensor([x[key] for x in r]),
                                   rtol=1e-5, atol=0, msg=key)


def run_main(setup, out, flags):
    data, llm = setup
    cli(train_vcp.main, [f"--data={data}", f"--text_from_llm={llm}", f"--out={out}"] + SCRIPT_FLAGS + flags)


def test_grad_accum_equals_the_big_batch(setup, tmp_path, capsys, monkeypatch):
    run_main(setup, tmp_path / "big", ["--batch_size=4"])
    run_main(setup, tmp_path / "acc", ["--batch_size=2", "--grad_accum=2"])
    assert_same_run(tmp_path / "acc", tmp_path / "big", atol=1e-5)   # measured 7.2e-7
    assert [r["negatives"] for r in metrics(tmp_path / "acc")] == [3, 3]
    assert "| negatives 3 |" in capsys.readouterr().out
    # the test can tell: plain accumulation (fit's own) scores CLIP within each micro-batch of 2
    monkeypatch.setattr(train_vcp, "partial", lambda *args: None)
    run_main(setup, tmp_path / "plain", ["--batch_size=2", "--grad_accum=2"])
    assert abs(metrics(tmp_path / "plain")[0]["clip"] - metrics(tmp_path / "big")[0]["clip"]) > 0.1


@pytest.mark.slow
def test_two_processes_with_accumulation_equal_one_process_with_the_whole_batch(setup, tmp_path):
    data, llm = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "train_vcp.py", f"--data={data}", f"--text_from_llm={llm}",
           f"--out={tmp_path / 'ddp'}", "--batch_size=2", "--grad_accum=2"] + SCRIPT_FLAGS
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_main(setup, tmp_path / "big", ["--batch_size=8"])
    # measured 1.05e-5 (hier.full.layers.0.mlp.2.weight); plain DDP, 2 x batch 4, is 1.01e-5 from it there
    assert_same_run(tmp_path / "ddp", tmp_path / "big", atol=3e-5)
    assert [r["negatives"] for r in metrics(tmp_path / "ddp")] == [7, 7]


def test_random_teacher_embeddings_keep_words_the_llm_merges(setup, tmp_path):
    """--teacher_embeddings=random: one seeded random vector per token in place of the LLM's, so two
    words whose LLM embeddings coincide still give two different sentence embeddings."""
    _, llm = setup
    state = hf.read_safetensors(str(llm / "model.safetensors"))
    embed = state["model.embed_tokens.weight"]
    tok = Tokenizer.from_pretrained(str(llm))
    warm, kalt = (tok.backend.token_to_id(w) for w in ("warm", "kalt"))
    assert None not in (warm, kalt)
    embed[kalt] = embed[warm]                      # the LLM cannot tell them apart
    twin = tmp_path / "llm"
    shutil.copytree(llm, twin)
    safetensors.torch.save_file(state, str(twin / "model.safetensors"))
    sentences = ["heute wird es warm", "heute wird es kalt"]
    for kind, same in (("llm", True), ("random", False)):
        teacher = text_encoder_from_llm(str(twin), train_vcp.LANG_CODES.values(), kind)
        emb = train_vcp.encode_sentences(teacher, sentences, "de_DE", "cpu")
        assert torch.equal(emb[0], emb[1]) == same, kind
    want = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(teacher.embed_tokens.weight[:len(embed)], want)
    with pytest.raises(UserError, match="teacher embeddings must be llm or random, got 'mbart'"):
        text_encoder_from_llm(str(twin), train_vcp.LANG_CODES.values(), "mbart")


def test_teacher_from_words_needs_no_llm(tmp_path):
    """--text_from_words=D (the demo's): a word-level tokenizer over the training sentences and one
    seeded random vector per word, mean-pooled, order-blind; an unseen word is <|unk|>. The VCP folder
    keeps it as an mBART-format text_encoder/ that loads back to the same sentence embeddings."""
    sentences = ["heute wird es warm", "heute wird es kalt", "morgen regen"]
    teacher = text_encoder_from_words(sentences, 16, train_vcp.LANG_CODES.values())
    emb = train_vcp.encode_sentences(teacher, sentences + ["es wird heute warm", "heute wird es heiss"], "de_DE", "cpu")
    assert emb.shape == (5, 16)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)          # warm and kalt: two random vectors
    torch.testing.assert_close(emb[0], emb[3])                     # a bag of words: order is the video's to give
    assert not torch.allclose(emb[3], emb[4], atol=1e-3)          # heiss was never seen: <|unk|>, not warm
    again = text_encoder_from_words(sentences, 16, train_vcp.LANG_CODES.values())
    assert torch.equal(again.embed_tokens.weight, teacher.embed_tokens.weight)   # seeded
    teacher.save_pretrained(str(tmp_path / "teacher"))
    loaded = load_text_encoder(str(tmp_path / "teacher"))
    torch.testing.assert_close(train_vcp.encode_sentences(loaded, sentences, "de_DE", "cpu"), emb[:3])
