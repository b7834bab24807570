"""Stage 2, visual contrastive pretraining (paper section 3.2, Eq. 2, Fig. 4).

A DINOv2 ViT (LoRA r=8, alpha=16) turns each frame into a feature; the hierarchical encoder
turns frame features into word-level features ("visual language", local attention then a
nearest-neighbour downsample by 4) and those into a sentence embedding (full attention with
a query token). The sentence embedding is aligned CLIP-style with the frozen mBART encoder's
embedding of the spoken sentence in a 768-d space, and SignCL regularises the word features:

    L_CL = L_CLIP + lambda * L_SignCL,   lambda = 1e-2

    torchrun --nproc_per_node 8 train_vcp.py --data=PHOENIX-2014-T --vit=dinov2-base \\
        --text_encoder=mbart-large-cc25 --out=out/vcp

The frozen teacher encodes every training sentence once, before training. The output folder
(VCPModel.save) holds the visual encoder that VLT uses.
"""

import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, make_dataclass
from functools import partial

import torch
import torch.nn.functional as F

from checkpoint import check_out, rng_state, set_rng_state
from cli import cli, flags_of, parse_config, setup_distributed
from data import ClipDataset, VideoTransform, collate_clips
from errors import UserError
from loader import to_device
from losses import clip_loss, signcl_loss, symmetric_cross_entropy
from readers import language_of, load_rows
from training import TrainConfig, autocast, fit, make_optimizer, parameter_counts, seed_everything, trainable_in_fp32
from vision import (HierarchicalConfig, VCPConfig, VCPModel, ViTConfig, load_text_encoder, text_encoder_from_llm,
                    text_encoder_from_words)

LANG_CODES = {"German": "de_DE", "Chinese": "zh_CN"}  # mBART's language codes


# The model's flags are fields of vision.py's configs, declared there once (defaults: the
# paper): VCPConfig's, the hierarchical encoder's, and a fresh ViT's shape (ignored with --vit).
VCP_FLAGS = {f: f for f in ("image_size", "resize", "max_frames", "stride", "frame_pool", "vit_tuning", "lora_r",
                            "lora_alpha", "clip_dim", "logit_scale_init", "grad_checkpointing", "vit_chunk_size")}
VIT_FLAGS = {"vit_dim": "hidden_size", "vit_layers": "num_hidden_layers", "vit_heads": "num_attention_heads",
             "patch_size": "patch_size"}
HIER_FLAGS = {f: f for f in ("dim", "heads", "local_layers", "window", "step", "full_layers", "dropout")}
ModelFlags = make_dataclass("ModelFlags", flags_of(VCPConfig, VCP_FLAGS) + flags_of(ViTConfig, VIT_FLAGS)
                            + flags_of(HierarchicalConfig, HIER_FLAGS), bases=(TrainConfig,))


@dataclass
class VCPTrainConfig(ModelFlags):
    data: str = ""                   # manifest dir / .jsonl, Phoenix-2014T root or CSL-Daily root
    split: str = "train"
    out: str = "out/vcp"
    vit: str = ""                    # DINOv2 folder (paper: dinov2-base); empty: a fresh ViT (vit_* flags)
    text_encoder: str = ""           # mBART folder (paper: mbart-large-cc25), or a Qwen2/Llama folder (Tab. 7 row 6:
                                     # the mean of its last hidden states)
    text_from_llm: str = ""          # instead: a bag of this LLM's token embeddings (a 0-layer mean-pooling
                                     # mBART-format encoder; a from-scratch LLM's states are no teacher yet)
    teacher_embeddings: str = "llm"  # with --text_from_llm: its token embeddings (llm) or one random vector per token
    text_from_words: int = 0         # > 0, the demo's: no folder; one random vector of this size per word of the
                                     # training sentences, mean-pooled (so VCP needs no CPT, as in the paper)
    cache_videos: bool = False       # keep decoded clips in memory (small datasets, num_workers=0)
    # frame augmentation (paper section C: centre square crop, resize 384, random crop 336)
    color_jitter: float = 0.2
    rotation: float = 5.0
    flip: float = 0.5
    signcl_weight: float = 1e-2      # lambda of Eq. 2
    dev_split: str = "dev"           # validation (--eval_every): dev CLIP loss picks the best, recall@1 logged
    # optimisation (paper: 200 epochs, batch 128, AdamW wd 1e-5, max lr 2e-4, one-cycle cosine)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 1e-5


def build_model(config: VCPTrainConfig, text_encoder) -> VCPModel:
    def pick(flags: dict) -> dict:  # {field: the value of its flag}
        return {field: getattr(config, flag) for flag, field in flags.items()}
    vit = ViTConfig(image_size=config.image_size, **pick(VIT_FLAGS))
    model_config = VCPConfig(vit=vit, vit_path=config.vit, hier=HierarchicalConfig(**pick(HIER_FLAGS)),
                             **pick(VCP_FLAGS))
    return VCPModel(model_config, text_encoder)


@torch.no_grad()
def encode_sentences(text_encoder, texts, lang, device, batch_size=64):
    """The frozen teacher's sentence embedding of every text, once: (N, text_dim) fp32."""
    text_encoder.to(device)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = text_encoder.tokenize(texts[i:i + batch_size], lang=lang)
        out.append(text_encoder.sentence_embedding(ids.to(device), mask.to(device)).float())
    return torch.cat(out)


def objective(out: dict, text_words, signcl_weight: float):
    """Eq. 2: L = L_CLIP + lambda * L_SignCL, as fit's `train_step` returns it: (loss, None, logs),
    a mean (CLIP over the global batch, SignCL over this rank's clips; fit averages over ranks)."""
    clip = clip_loss(out["video_emb"], out["text_emb"], out["logit_scale"])  # over the global batch
    signcl = signcl_loss(out["word_features"], out["word_mask"], text_words)
    return clip + signcl_weight * signcl, None, {"clip": clip.detach(), "signcl": signcl.detach()}


# ----------------------------------------------------------------------------- GradCache

GRAD_KEYS = ("video_emb", "text_emb", "word_features", "logit_scale")  # what the objective differentiates


def join(outs: list) -> dict:
    """Micro-batches' outputs as one batch's: rows concatenated, word features padded to the longest."""
    T = max(o["word_features"].shape[1] for o in outs)
    words = torch.cat([F.pad(o["word_features"], (0, 0, 0, T - o["word_features"].shape[1])) for o in outs])
    mask = torch.cat([F.pad(o["word_mask"], (0, T - o["word_mask"].shape[1])) for o in outs])  # padding: False
    return {"video_emb": torch.cat([o["video_emb"] for o in outs]),  # (k*b, D)
            "text_emb": torch.cat([o["text_emb"] for o in outs]),  # (k*b, D)
            "word_features": words, "word_mask": mask,  # (k*b, T, D), (k*b, T)
            "logit_scale": outs[-1]["logit_scale"]}  # the same in every micro-batch: its gradient goes to the last


def grad_cache_window(encode, loss_of, net, stream, train_step, grad_accum, dist, precision, scaler, mode):
    """One accumulation window as ONE contrastive batch of grad_accum x batch_size clips per rank
    (GradCache, Gao et al. 2021): fit's `accumulate` (`_accumulate`'s arguments and return).
    Plain accumulation would give CLIP only each micro-batch's negatives. Pass 1 embeds every
    micro-batch without a graph; the loss over the whole window (CLIP over every rank's window)
    gives the gradient of each embedding; pass 2 re-runs each micro-batch with a graph, the
    same dropout draws, and back-propagates its cached gradient. The cost: a second forward."""
    device, batches, states, cached = dist.device, [], [], []
    for _ in range(grad_accum):  # pass 1, no graph; the batches (augmented in the loader) are replayed as they are,
        batches.append(next(stream))  # from host memory: k micro-batches of frames would not fit beside the model
        states.append(rng_state(device))  # dropout draws from torch's generator (and the device's)
        with torch.no_grad(), autocast(device, precision):
            out = encode(net, to_device(batches[-1], device))
        cached.append({"word_mask": out["word_mask"], **{k: out[k].float().requires_grad_() for k in GRAD_KEYS}})
    loss, _, logs = loss_of(join(cached), torch.cat([b["index"] for b in batches]))
    (loss * grad_accum).backward()  # the leaves' fp32 gradients; fit's step divides a window by grad_accum
    after = rng_state(device)
    for i, (batch, leaves) in enumerate(zip(batches, cached)):  # pass 2: one micro-batch's graph at a time
        set_rng_state(states[i], device)
        with nullcontext() if not dist.ddp or i == grad_accum - 1 else net.no_sync():  # DDP: reduce once
            with autocast(device, precision):
                out = encode(net, to_device(batch, device))
            surrogate = sum((out[k].float() * leaves[k].grad).sum() for k in GRAD_KEYS if leaves[k].grad is not None)
            (scaler.scale(surrogate) if scaler is not None else surrogate).backward()  # d surrogate/d out = cached
    set_rng_state(after, device)  # where the loss left the stream: no draw is used twice
    logs = {k: float(v) for k, v in logs.items()}
    return (loss.detach() * grad_accum).double(), torch.zeros((), dtype=torch.float64, device=device), logs, "mean"


@torch.no_grad()
def validate(model: VCPModel, clips: ClipDataset, text_sentence, dist, batch_size: int) -> dict:
    """Dev CLIP loss and video->text recall@1 over the whole dev split (section 3.2; the paper
    trains "until validation performance stops improving"). Each rank encodes every
    world_size-th clip; the embeddings are gathered, so every rank scores the same matrix. A
    hit is the right sentence, or another clip's identical one (real splits repeat sentences)."""
    mine, video = list(range(dist.rank, len(clips), dist.world_size)), {}
    for i in range(0, len(mine), batch_size):
        batch = collate_clips([clips[j] for j in mine[i:i + batch_size]])
        out = model.encode_video(batch["frames"].to(dist.device), batch["frame_mask"].to(dist.device))
        video.update(zip(mine[i:i + batch_size], out["video_emb"].float().cpu()))
    if dist.ddp:
        every = [None] * dist.world_size
        torch.distributed.all_gather_object(every, video)
        video = {k: v for d in every for k, v in d.items()}
    v = F.normalize(torch.stack([video[i] for i in range(len(clips))]), dim=-1)  # (N, clip_dim)
    t = F.normalize(model.encode_text(text_sentence=text_sentence.to(dist.device)).float().cpu(), dim=-1)
    logits = model.clip_scale().float().cpu() * v @ t.T  # (N, N) video i vs sentence j
    loss = symmetric_cross_entropy(logits)  # clip_loss without its gather: every rank holds all rows
    texts = [r["text"] for r in clips.rows]
    r1 = sum(texts[j] == texts[i] for i, j in enumerate(logits.argmax(1).tolist())) / len(clips)
    return {"dev_loss": loss.item(), "dev_r1": 100.0 * r1}


def main(argv):
    config = parse_config(VCPTrainConfig, argv)
    if not config.data:
        raise UserError("--data is required: a manifest folder, a Phoenix-2014T root or a CSL-Daily root")
    if [bool(config.text_encoder), bool(config.text_from_llm), config.text_from_words > 0].count(True) != 1:
        raise UserError("give exactly one of --text_encoder (an mBART folder), --text_from_llm (an LLM folder) "
                        "and --text_from_words (a vector size)")
    check_out(config.out, "vcp", data=config.data, text_encoder=config.text_encoder,
              text_from_llm=config.text_from_llm, vit=config.vit)
    dist = setup_distributed(config.device)
    if config.batch_size * dist.world_size < 2:  # CLIP's negatives are the batch's other pairs
        raise UserError(f"--batch_size={config.batch_size} on {dist.world_size} process(es): a contrastive batch of "
                        "one pair has no negatives (its loss is 0, or NaN); give at least 2 pairs per step")
    seed_everything(config.seed)  # the same initial weights on every rank

    rows = load_rows(config.data, config.split)
    language, _ = language_of(config.data)
    transform = VideoTransform(size=config.image_size, resize=config.resize, train=True,
                               color_jitter=config.color_jitter, rotation=config.rotation, flip_p=config.flip)
    dataset = ClipDataset(rows, transform, max_frames=config.max_frames, stride=config.stride, train=True,
                          seed=config.seed, cache_videos=config.cache_videos)

    texts, lang = [r["text"] for r in rows], LANG_CODES.get(language, "de_DE")
    if config.text_encoder:
        text_encoder = load_text_encoder(config.text_encoder).requires_grad_(False)
    elif config.text_from_llm:
        text_encoder = text_encoder_from_llm(config.text_from_llm, LANG_CODES.values(), config.teacher_embeddings)
    else:
        text_encoder = text_encoder_from_words(texts, config.text_from_words, LANG_CODES.values())
    text_sentence = encode_sentences(text_encoder, texts, lang, dist.device)
    text_words = torch.tensor([len(t.split()) if language != "Chinese" else len(t) for t in texts], device=dist.device)
    dev_rows = load_rows(config.data, config.dev_split) if config.eval_every else []
    dev_clips = ClipDataset(dev_rows, VideoTransform(size=config.image_size, resize=config.resize, train=False),
                            max_frames=config.max_frames, stride=config.stride, train=False)
    dev_texts = [r["text"] for r in dev_rows]
    dev_sentence = encode_sentences(text_encoder, dev_texts, lang, dist.device) if dev_rows else None
    model = build_model(config, text_encoder)
    # the teacher's folder, relative to the output folder so the tree can move; a teacher made
    # here (not read from --text_encoder) is written beside the visual encoder as a real mBART-format folder
    teacher = config.text_encoder or os.path.join(config.out, "text_encoder")
    model.config.text_encoder_path = os.path.relpath(os.path.abspath(teacher), os.path.abspath(config.out))
    dist.log(f"{len(rows)} clips ({language})")
    dist.log(parameter_counts(model, {"ViT": ("vit.", "frame_proj."), "local": "hier.local.", "full": "hier.full.",
                                      "hierarchical": "hier.", "teacher": "text_encoder.",
                                      "CLIP heads": ("video_proj.", "text_proj.", "logit_scale")}))
    trainable_in_fp32(model)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    from bench import activation_line  # a measurement, off the reading path
    dist.log(activation_line(model.to(dist.device), config, dist.device))  # measured on one frame (bench.py)

    negatives = config.batch_size * config.grad_accum * dist.world_size - 1  # per clip, in every step's CLIP loss

    def encode(net, batch):
        return net(batch["frames"], batch["frame_mask"], text_sentence=text_sentence[batch["index"]])

    def loss_of(out, index):  # Eq. 2 over a micro-batch, or over a window (GradCache)
        loss, _, logs = objective(out, text_words[index], config.signcl_weight)
        return loss, None, {**logs, "negatives": negatives}

    def train_step(net, batch):
        return loss_of(encode(net, batch), batch["index"])

    def save(folder):
        model.save(folder)
        if not config.text_encoder:
            text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))

    # drop_last: the CLIP loss needs the same batch on every rank, and a batch of one pair learns nothing
    fit(model, train_step, dataset, optimizer, config, dist, collate_fn=collate_clips, save_fn=save,
        unit="clips", drop_last=True, stage="vcp", metric="dev_loss", higher_is_better=False,
        evaluate=lambda m: validate(m, dev_clips, dev_sentence, dist, config.batch_size),
        accumulate=partial(grad_cache_window, encode, loss_of) if config.grad_accum > 1 else None)  # k=1: one pass
    dist.log(f"saved {config.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
