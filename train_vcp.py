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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import ClipDataset, VideoTransform, collate_clips, language_of, load_rows
from hf import checkpoint_folder, read_safetensors
from losses import clip_loss, signcl_loss, symmetric_cross_entropy
from tokenizer import Tokenizer
from training import (TrainConfig, autocast, check_out, cli, fit, make_optimizer, parse_config, resolve_precision,
                      seed_everything, setup_distributed, trainable_in_fp32)
from vision import (HierarchicalConfig, TextEncoder, TextEncoderConfig, VCPConfig, VCPModel, ViTConfig,
                    load_text_encoder)

LANG_CODES = {"German": "de_DE", "Chinese": "zh_CN"}  # mBART's language codes


@dataclass
class VCPTrainConfig(TrainConfig):
    data: str = ""                   # manifest dir / .jsonl, Phoenix-2014T root or CSL-Daily root
    split: str = "train"
    out: str = "out/vcp"
    vit: str = ""                    # DINOv2 folder (paper: dinov2-base); empty: a fresh ViT (vit_* below)
    text_encoder: str = ""           # mBART folder (paper: mbart-large-cc25), or a Qwen2/Llama folder (Tab. 7 row 6:
                                     # the mean of its last hidden states)
    text_from_llm: str = ""          # instead, the demo's: a bag of this LLM's token embeddings (a 0-layer mean-pooling
                                     # mBART-format encoder; a from-scratch LLM's states are no teacher yet)
    # frames (paper section C: centre square crop, resize 384, random crop 336)
    image_size: int = 336
    resize: int = 384
    max_frames: int = 256
    stride: int = 1                  # temporal stride before subsampling to max_frames
    cache_videos: bool = False       # keep decoded clips in memory (small datasets, num_workers=0)
    color_jitter: float = 0.2
    rotation: float = 5.0
    flip: float = 0.5
    # model (defaults: the paper)
    frame_pool: str = "cls"          # cls (paper, pretrained DINOv2) | flat (tiny from-scratch ViTs, see README)
    vit_tuning: str = "lora"         # lora | full | frozen
    lora_r: int = 8
    lora_alpha: float = 16.0
    vit_dim: int = 768               # a fresh ViT's shape (ignored with --vit)
    vit_layers: int = 12
    vit_heads: int = 12
    patch_size: int = 14
    dim: int = 768                   # hierarchical encoder width
    heads: int = 12
    local_layers: int = 4
    window: int = 16
    step: int = 4
    full_layers: int = 8
    dropout: float = 0.1
    clip_dim: int = 768
    logit_scale_init: float = 1 / 0.07
    signcl_weight: float = 1e-2
    grad_checkpointing: bool = False
    vit_chunk_size: int = 64         # frames per ViT call (bounds memory; raise it for tiny frames)
    dev_split: str = "dev"           # validation (--eval_every): dev CLIP loss picks the best, recall@1 logged
    # optimisation (paper: 200 epochs, batch 128, AdamW wd 1e-5, max lr 2e-4, one-cycle cosine)
    epochs: int = 200
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 1e-5


def text_encoder_from_llm(folder: str) -> TextEncoder:
    """A teacher for from-scratch demos: the trained LLM's token embeddings, mean-pooled.

    Sentences sharing words land close together, which a random frozen encoder does not give.
    It is an mBART-format encoder with no layers, so the rest of the pipeline is unchanged.
    """
    folder = checkpoint_folder(folder)
    tok = Tokenizer.from_pretrained(folder)
    backend = tok.backend
    backend.add_special_tokens(["</s>", *LANG_CODES.values()])
    path = os.path.join(folder, "model.safetensors")
    embed = read_safetensors(path, keep=lambda k: k == "model.embed_tokens.weight").get("model.embed_tokens.weight")
    if embed is None:
        raise ValueError(f"{path}: no model.embed_tokens.weight; --text_from_llm takes a Qwen2/Llama folder")
    embed = embed.float()  # (V, D)
    cfg = TextEncoderConfig(vocab_size=backend.get_vocab_size(with_added_tokens=True), d_model=embed.shape[1],
                            encoder_layers=0, encoder_attention_heads=1, encoder_ffn_dim=embed.shape[1],
                            max_position_embeddings=512, scale_embedding=False, pad_token_id=tok.pad_token_id,
                            pool="mean")
    enc = TextEncoder(cfg, backend, path="")
    with torch.no_grad():
        enc.embed_tokens.weight[:embed.shape[0]] = embed
        enc.embed_positions.weight.zero_()  # a bag of words: order is what the video must supply
    return enc.requires_grad_(False).eval()


def build_model(cfg: VCPTrainConfig, text_encoder) -> VCPModel:
    vit = ViTConfig(hidden_size=cfg.vit_dim, num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                    patch_size=cfg.patch_size, image_size=cfg.image_size)
    hier = HierarchicalConfig(dim=cfg.dim, heads=cfg.heads, local_layers=cfg.local_layers, window=cfg.window,
                              step=cfg.step, full_layers=cfg.full_layers, dropout=cfg.dropout)
    model_cfg = VCPConfig(vit=vit, vit_path=cfg.vit, image_size=cfg.image_size, resize=cfg.resize,
                          max_frames=cfg.max_frames, stride=cfg.stride, vit_tuning=cfg.vit_tuning,
                          lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, frame_pool=cfg.frame_pool,
                          grad_checkpointing=cfg.grad_checkpointing, vit_chunk_size=cfg.vit_chunk_size,
                          hier=hier, clip_dim=cfg.clip_dim,
                          logit_scale_init=cfg.logit_scale_init)
    return VCPModel(model_cfg, text_encoder)


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


def kept_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `fn()` runs (each storage
    once, parameters excluded): the activation memory of a forward, on any device."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_estimate(model: VCPModel, frames_per_batch: int, device, precision: str) -> dict:
    """The activation memory of one micro-batch where it is large (section 3.2: the ViT at
    336 px), measured on one frame: the frames themselves (fp32) and what the ViT keeps for the
    backward pass per frame, times the batch's frames, plus, with grad_checkpointing, the
    recompute of one chunk (--vit_chunk_size frames). The hierarchical encoder's share is
    small beside it (its tokens are the frames' CLS features, not their patches)."""
    vit, size = model.vit, model.cfg.image_size
    x = torch.zeros(2, 3, size, size, device=device)
    was_training, ckpt = vit.training, vit.grad_checkpointing
    vit.train()
    try:
        with autocast(torch.device(device), precision):
            vit.grad_checkpointing = False
            full = (kept_bytes(lambda: vit(x)) - kept_bytes(lambda: vit(x[:1]))) or 1  # per frame: the slope
            vit.grad_checkpointing = ckpt
            per_frame = kept_bytes(lambda: vit(x)) - kept_bytes(lambda: vit(x[:1])) if ckpt else full
    finally:
        vit.grad_checkpointing = ckpt
        vit.train(was_training)
    peak = full * min(vit.chunk_size or frames_per_batch, frames_per_batch) if ckpt else 0
    pixels = 3 * size * size * 4  # one fp32 frame of the batch
    return {"mib_per_frame": per_frame / 2**20, "full_mib_per_frame": full / 2**20,
            "gib": ((per_frame + pixels) * frames_per_batch + peak) / 2**30}


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
    cfg = parse_config(VCPTrainConfig, argv)
    if not cfg.data:
        raise ValueError("--data is required: a manifest folder, a Phoenix-2014T root or a CSL-Daily root")
    if bool(cfg.text_encoder) == bool(cfg.text_from_llm):
        raise ValueError("give exactly one of --text_encoder (an mBART folder) and --text_from_llm (an LLM folder)")
    check_out(cfg.out, "vcp", data=cfg.data, text_encoder=cfg.text_encoder, text_from_llm=cfg.text_from_llm,
              vit=cfg.vit)
    dist = setup_distributed(cfg.device)
    seed_everything(cfg.seed)  # the same initial weights on every rank

    rows = load_rows(cfg.data, cfg.split)
    language, _ = language_of(cfg.data)
    transform = VideoTransform(size=cfg.image_size, resize=cfg.resize, train=True, color_jitter=cfg.color_jitter,
                               rotation=cfg.rotation, flip_p=cfg.flip)
    dataset = ClipDataset(rows, transform, max_frames=cfg.max_frames, stride=cfg.stride, train=True, seed=cfg.seed,
                          cache_videos=cfg.cache_videos)

    if cfg.text_encoder:
        text_encoder = load_text_encoder(cfg.text_encoder).requires_grad_(False)
    else:
        text_encoder = text_encoder_from_llm(cfg.text_from_llm)
    texts = [r["text"] for r in rows]
    text_sentence = encode_sentences(text_encoder, texts, LANG_CODES.get(language, "de_DE"), dist.device)
    text_words = torch.tensor([len(t.split()) if language != "Chinese" else len(t) for t in texts])
    dev_rows = load_rows(cfg.data, cfg.dev_split) if cfg.eval_every else []
    dev_clips = ClipDataset(dev_rows, VideoTransform(size=cfg.image_size, resize=cfg.resize, train=False),
                            max_frames=cfg.max_frames, stride=cfg.stride, train=False)
    dev_sentence = encode_sentences(text_encoder, [r["text"] for r in dev_rows], LANG_CODES.get(language, "de_DE"),
                                    dist.device) if dev_rows else None
    model = build_model(cfg, text_encoder)
    # the teacher's folder, relative to the output folder so the tree can move; a teacher made
    # from the LLM is written beside the visual encoder as a real mBART-format folder
    teacher = os.path.join(cfg.out, "text_encoder") if cfg.text_from_llm else cfg.text_encoder
    model.cfg.text_encoder_path = os.path.relpath(os.path.abspath(teacher), os.path.abspath(cfg.out))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.log(f"{len(rows)} clips ({language}); VCP model {n_train / 1e6:.2f}M trainable parameters")
    trainable_in_fp32(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    # a micro-batch of clips that all reach --max_frames is the longest one
    est = activation_estimate(model.to(dist.device), cfg.batch_size * cfg.max_frames, dist.device,
                              resolve_precision(cfg.precision, dist.device))
    dist.log(f"activation memory estimate (ViT): {est['gib']:.1f} GiB per process for the longest micro-batch "
             f"({cfg.batch_size} clips x {cfg.max_frames} frames; {est['mib_per_frame']:.3g} MiB kept per frame "
             f"beside its pixels"
             + (f", plus the recompute of {cfg.vit_chunk_size} frames)" if cfg.grad_checkpointing else ")"))

    def train_step(model, batch):
        out = model(batch["frames"], batch["frame_mask"], text_sentence=text_sentence[batch["index"]])
        return objective(out, text_words[batch["index"]].to(dist.device), cfg.signcl_weight)

    def save(folder):
        model.save(folder)
        if cfg.text_from_llm:
            text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))

    # drop_last: the CLIP loss needs the same batch on every rank, and a batch of one pair learns nothing
    fit(model, train_step, dataset, optimizer, cfg, dist, collate_fn=collate_clips, save_fn=save,
        unit="clips", drop_last=True, stage="vcp", metric="dev_loss", higher_is_better=False,
        evaluate=lambda m: validate(m, dev_clips, dev_sentence, dist, cfg.batch_size))
    dist.log(f"saved {cfg.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
