"""Stage 3, visual language tuning (paper section 3.3, Tab. 8, Tab. F/G).

The LLM (from CPT) and the visual encoder (from VCP) are frozen; a 2-layer MLP connector maps
the word-level visual tokens into the LLM's embedding space, where they fill the user turn of
a chat prompt whose system turn carries the task and format prompts. The loss is the LM loss
on the response only. Since both encoders are frozen, the word features are computed once
and cached on disk. An optional second pass (`--full_tune=true`, lr 1e-5) unfreezes the
visual encoder and puts LoRA on the LLM; it reads the videos again (no cache).

    torchrun --nproc_per_node 8 train_vlt.py --data=CSL-Daily --cpt=out/cpt --vcp=out/vcp --out=out/vlt
    torchrun --nproc_per_node 8 train_vlt.py --data=CSL-Daily --init=out/vlt --full_tune=true --out=out/vlt_full

Ablations (Tab. 8): --connector=linear, --visual_tokens=sentence, --prompt=no_format|none.
"""

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from data import (ClipDataset, VideoTransform, build_chat_example, chat_prefix_ids, collate_clips, collate_vlt,
                  language_of, load_rows, system_prompt)
from eval import EvalConfig, score, translate
from hf import checkpoint_folder, file_sha256, read_json, read_safetensors, safetensors_metadata
from losses import lm_loss
from model import LLM, Connector, LLaVASLT, PrefixCache, apply_lora
from tokenizer import Tokenizer
from training import (TrainConfig, check_out, cli, fit, loader_workers, make_optimizer, parse_config,
                      seed_everything, setup_distributed, trainable_in_fp32)
from vision import VCPModel


@dataclass
class VLTConfig(TrainConfig):
    data: str = ""                   # manifest dir / .jsonl, Phoenix-2014T root or CSL-Daily root
    split: str = "train"
    out: str = "out/vlt"
    cpt: str = ""                    # the LLM folder (stage 1, or a Hugging Face Instruct model)
    vcp: str = ""                    # the visual encoder folder (stage 2)
    init: str = ""                   # a LLaVA-SLT folder to continue from (its cpt/vcp/connector)
    connector: str = "mlp"           # mlp (paper) | linear (Tab. 8 row 2)
    visual_tokens: str = "word"      # word (paper) | sentence (Tab. 8 row 1: the full-attention penultimate layer)
    prompt: str = "full"             # full (task + format prompt) | no_format | none (Tab. 8 rows 3, 4)
    cache: str = ""                  # word-feature cache folder; default: beside --out, "<out>_cache"
    full_tune: bool = False          # unfreeze the visual encoder, LoRA on the LLM (paper: lr 1e-5)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"
    augment: bool = True             # frame augmentation during full-tuning
    cache_videos: bool = False       # full-tuning: keep decoded clips in memory (small datasets)
    dtype: str = "float32"           # LLM weights (bfloat16 for 7B+ on GPU)
    dev_split: str = "dev"           # validation (--eval_every): dev BLEU-4, greedy, picks the best checkpoint
    eval_max_new_tokens: int = 64
    # optimisation (paper: batch 64, AdamW wd 1e-3, max lr 1e-3, one-cycle cosine; full-tuning
    # "with a small learning rate of 1e-5")
    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None       # default: 1e-3, or 1e-5 with --full_tune=true
    weight_decay: float = 1e-3

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-5 if self.full_tune else 1e-3
        super().__post_init__()


def prompt_system(cfg: VLTConfig, language: str) -> str:
    if cfg.prompt not in ("full", "no_format", "none"):
        raise ValueError(f"--prompt={cfg.prompt}: expected full, no_format or none")
    return system_prompt(language, task=cfg.prompt != "none", format=cfg.prompt == "full")


# ----------------------------------------------------------------------------- the word-feature cache
# The frozen visual encoder sees every clip once (eval transform); its features are stored
# per clip id with a fingerprint of what made them, and rebuilt when that changes.

def _video_stamp(path: str) -> list:
    """What changes when a clip is regenerated or re-encoded in place: an mp4's size and
    modification time; a frame folder's file count and the first and last frames' size and time."""
    st = os.stat(path)
    if not os.path.isdir(path):
        return [st.st_size, st.st_mtime_ns]
    names = sorted(os.listdir(path))
    ends = [os.stat(os.path.join(path, n)) for n in names[:1] + names[-1:]]
    return [len(names), st.st_mtime_ns] + [x for e in ends for x in (e.st_size, e.st_mtime_ns)]


def fingerprint(vcp_folder: str, rows, visual_tokens: str, weights_sha256: str = "") -> str:
    """weights_sha256: the encoder weights' hash when the caller has it already (a few hundred MB to read)."""
    h = hashlib.sha256()
    h.update((weights_sha256 or file_sha256(os.path.join(vcp_folder, "model.safetensors"))).encode())
    with open(os.path.join(vcp_folder, "config.json"), "rb") as f:
        h.update(f.read())  # holds the frame preprocessing (size, resize, max_frames, stride)
    h.update(visual_tokens.encode())
    h.update(json.dumps([(r["id"], str(r["video"]), _video_stamp(str(r["video"]))) for r in rows]).encode())
    return h.hexdigest()


@torch.no_grad()
def build_cache(path, model: LLaVASLT, rows, dist, batch_size, num_workers, key):
    """{clip id: (N, D) visual tokens} in one safetensors file; rank 0 writes, the others wait."""
    from safetensors.torch import save_file
    fresh = False
    if dist.is_main and os.path.isfile(path):  # rank 0 decides: every rank meets in the barrier below
        try:
            fresh = safetensors_metadata(path).get("fingerprint") == key
        except ValueError:  # a corrupt cache is rebuilt like a stale one
            pass
        dist.log(f"word features: using the cache {path}" if fresh
                 else f"word features: {path} was made by another encoder or data; rebuilding it")
    if dist.is_main and not fresh:
        vcp = model.visual_encoder
        cfg = vcp.cfg
        dataset = ClipDataset(rows, VideoTransform(cfg.image_size, cfg.resize, train=False),
                              max_frames=cfg.max_frames, stride=cfg.stride, train=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_clips,
                                             num_workers=num_workers)
        was_training = vcp.training
        vcp.eval()
        features = {}
        from tqdm import tqdm
        for batch in tqdm(loader, desc="caching word features", dynamic_ncols=True):
            feats, mask = model.visual_features(batch["frames"].to(dist.device), batch["frame_mask"].to(dist.device))
            for clip_id, f, m in zip(batch["ids"], feats.float().cpu(), mask.cpu()):
                features[clip_id] = f[m].contiguous()  # (N_valid, D)
        vcp.train(was_training)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(features, tmp, metadata={"fingerprint": key})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; teammates read the cache too
        os.replace(tmp, path)  # atomic: a half-written cache is never read
    dist.barrier()
    return read_safetensors(path)


class CachedVLTDataset(torch.utils.data.Dataset):
    """Cached visual tokens + the chat example with one slot per token and the answer. Nothing
    here changes between epochs, so the examples are built (chat template, tokenizer) once."""

    def __init__(self, rows, features, tok, system):
        self.features = [features[row["id"]] for row in rows]
        self.examples = [build_chat_example(tok, system, len(f), answer=row["text"])
                         for row, f in zip(rows, self.features)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {"word_features": self.features[i], **self.examples[i]}


class VideoVLTDataset(torch.utils.data.Dataset):
    """Frames (for full-tuning) + the chat example; the slot count follows from the frame count."""

    def __init__(self, clips: ClipDataset, tok, system, n_tokens):
        self.clips, self.tok, self.system, self.n_tokens = clips, tok, system, n_tokens

    @property
    def in_memory(self) -> bool:
        return self.clips.in_memory

    def set_epoch(self, epoch):
        self.clips.set_epoch(epoch)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        clip = self.clips[i]
        n = self.n_tokens(clip["frames"].shape[0])
        return {**clip, **build_chat_example(self.tok, self.system, n, answer=clip["text"])}


def pad_features(features) -> tuple:
    """[(N_i, D)] -> (B, N, D) zero-padded, (B, N) mask."""
    n = torch.tensor([len(f) for f in features])
    padded = torch.zeros(len(features), int(n.max()), features[0].shape[-1])
    for i, f in enumerate(features):
        padded[i, :n[i]] = f
    return padded, torch.arange(padded.shape[1])[None] < n[:, None]


def collate_cached(items, pad_id):
    batch = collate_vlt(items, pad_id)
    batch["word_features"], batch["word_mask"] = pad_features([it["word_features"] for it in items])  # (B, N, D)
    return batch


@torch.no_grad()
def validate(model: LLaVASLT, tok, system, rows, level, dist, cfg, features=None, clips=None) -> dict:
    """Dev BLEU-4 and ROUGE-L with greedy decoding (the paper trains "until validation
    performance stops improving"), scored as eval.py scores. Each rank translates every
    world_size-th clip (cached features, or frames through the tuned encoder); all ranks then
    score all of them, so every rank takes the same decisions."""
    ecfg = EvalConfig(num_beams=1, max_new_tokens=cfg.eval_max_new_tokens)
    mine, hyps = list(range(dist.rank, len(rows), dist.world_size)), {}
    for i in range(0, len(mine), cfg.batch_size):
        part = mine[i:i + cfg.batch_size]
        if features is not None:
            feats, mask = pad_features([features[rows[j]["id"]] for j in part])
            batch = {"ids": [rows[j]["id"] for j in part], "word_features": feats, "word_mask": mask}
        else:
            batch = collate_clips([clips[j] for j in part])
        hyps.update(zip(part, translate(model, tok, system, batch, ecfg, dist.device)))
    if dist.ddp:
        every = [None] * dist.world_size
        torch.distributed.all_gather_object(every, hyps)
        hyps = {k: v for d in every for k, v in d.items()}
    scores = score([hyps[i] for i in range(len(rows))], [r["text"] for r in rows], level)
    return {"dev_bleu4": scores["bleu4"], "dev_rouge": scores["rouge"]}


def collate_video(items, pad_id):
    return {**collate_vlt(items, pad_id), **collate_clips(items)}


def main(argv):
    cfg = parse_config(VLTConfig, argv)
    if not cfg.data:
        raise ValueError("--data is required: a manifest folder, a Phoenix-2014T root or a CSL-Daily root")
    if cfg.visual_tokens not in ("word", "sentence"):
        raise ValueError(f"--visual_tokens={cfg.visual_tokens}: expected word or sentence")
    cache_dir = cfg.cache or os.path.normpath(cfg.out) + "_cache"
    check_out(cfg.out, "vlt", data=cfg.data, cpt=cfg.cpt, vcp=cfg.vcp, init=cfg.init, cache=cache_dir)
    dist = setup_distributed(cfg.device)
    seed_everything(cfg.seed)
    rows = load_rows(cfg.data, cfg.split)
    dev_rows = load_rows(cfg.data, cfg.dev_split) if cfg.eval_every else []
    language, level = language_of(cfg.data)
    system = prompt_system(cfg, language)
    dtype = getattr(torch, cfg.dtype)

    # the model: a previous LLaVA-SLT folder, or the CPT LLM + the VCP encoder + a fresh connector
    if cfg.init:
        model = LLaVASLT.load(cfg.init, VCPModel.load, dtype=dtype)
        cpt, vcp = model.config["llm"], model.config["visual"]
        check_out(cfg.out, "vlt", **{"init's LLM": cpt, "init's visual encoder": vcp})
        if model.visual_tokens != cfg.visual_tokens:
            raise ValueError(f"--visual_tokens={cfg.visual_tokens} but {cfg.init} was trained with {model.visual_tokens}")
    else:
        if not cfg.cpt or not cfg.vcp:
            raise ValueError("give --cpt (an LLM folder) and --vcp (a visual encoder folder), or --init")
        cpt, vcp = cfg.cpt, cfg.vcp
        llm = LLM.from_pretrained(cpt, dtype=dtype)
        visual = VCPModel.load(vcp)
        visual_dim = visual.cfg.hier.dim
        model = LLaVASLT(llm, Connector(visual_dim, llm.config.hidden_size, cfg.connector), visual,
                         cfg.visual_tokens)
    visual_sha256 = None
    if not cfg.full_tune:  # the connector is only good for this encoder: eval and --init check it
        visual_sha256 = file_sha256(os.path.join(checkpoint_folder(vcp), "model.safetensors"))
        saved = os.path.join(checkpoint_folder(cfg.out), "config.json")
        if cfg.resume and os.path.isfile(saved) and read_json(saved).get("visual_sha256") not in (None, visual_sha256):
            raise ValueError(f"--resume: {cfg.out} was trained on another visual encoder than {vcp} holds now "
                             "(another sha256); start a new --out, or restore that encoder")
    tok = Tokenizer.from_pretrained(cpt)
    tok.check_fits(model.llm.config.vocab_size, cpt)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if cfg.full_tune:
        # section 3.3: "we unfreeze the visual encoder and LLM (LoRA if used)"; the CLIP heads
        # (video/text projections, logit scale) are not on this path and stay frozen
        # word tokens leave the hierarchical encoder before its full-attention part; the
        # sentence-level ablation's leave it before its last layer: train what is on the path
        on_path = ("hier.input_proj.", "hier.local.")
        if cfg.visual_tokens == "sentence":
            on_path += ("hier.query",) + tuple(f"hier.full.layers.{i}."
                                               for i in range(model.visual_encoder.cfg.hier.full_layers - 1))
        apply_lora(model.llm, tuple(cfg.lora_targets.split(",")), cfg.lora_r, cfg.lora_alpha)
        for name, p in model.visual_encoder.named_parameters():
            p.requires_grad_(name.startswith(on_path + ("frame_proj.",)) or ".lora_" in name
                             or (model.visual_encoder.cfg.vit_tuning == "full" and name.startswith("vit.")
                                 and "mask_token" not in name))

    # the data: cached visual tokens (frozen encoder), or frames (full-tuning)
    if cfg.full_tune:
        vc = model.visual_encoder.cfg
        transform = VideoTransform(vc.image_size, vc.resize, train=cfg.augment)
        clips = ClipDataset(rows, transform, max_frames=vc.max_frames, stride=vc.stride, train=True, seed=cfg.seed,
                            cache_videos=cfg.cache_videos)
        step = vc.hier.step
        n_tokens = lambda T: math.ceil(T / step)  # noqa: E731  (word or sentence level: one per downsampled position)
        dataset = VideoVLTDataset(clips, tok, system, n_tokens)
        collate = lambda items: collate_video(items, tok.pad_token_id)  # noqa: E731
        dev = dict(clips=ClipDataset(dev_rows, VideoTransform(vc.image_size, vc.resize, train=False),
                                     max_frames=vc.max_frames, stride=vc.stride, train=False))
    else:
        model.visual_encoder.to(dist.device)
        path = os.path.join(cache_dir, f"{cfg.split}-{cfg.visual_tokens}.safetensors")
        workers, vcp_read = loader_workers(cfg.num_workers, dist.device), checkpoint_folder(vcp)
        features = build_cache(path, model, rows, dist, cfg.batch_size, workers,
                               fingerprint(vcp_read, rows, cfg.visual_tokens, visual_sha256))
        dataset = CachedVLTDataset(rows, features, tok, system)
        collate = lambda items: collate_cached(items, tok.pad_token_id)  # noqa: E731
        dev = dict(features=build_cache(
            os.path.join(cache_dir, f"{cfg.dev_split}-{cfg.visual_tokens}.safetensors"), model, dev_rows, dist,
            cfg.batch_size, workers, fingerprint(vcp_read, dev_rows, cfg.visual_tokens, visual_sha256))
            if dev_rows else {})
        model.visual_encoder = None  # not needed while training on the cache; saved by path
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dist.log(f"{len(rows)} clips ({language}); {n_train / 1e6:.3f}M trainable parameters"
             f"{' (full-tune)' if cfg.full_tune else ' (connector)'}")
    trainable_in_fp32(model)  # the connector (and LoRA, the tuned encoder) in fp32 beside a bf16 LLM
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)

    # Every prompt starts with the same system turn and user header; with the LLM frozen, their
    # keys and values are computed once (PrefixCache), not in every step: about half the
    # positions of a prompt.
    model.to(dist.device)
    prefix_ids = chat_prefix_ids(tok, system)
    prefix = PrefixCache(model.llm, prefix_ids) if prefix_ids and not cfg.full_tune else None

    def train_step(net, batch):  # net: the model, or its DDP wrapper under torchrun
        if cfg.full_tune:
            logits = net(batch["input_ids"], batch["attention_mask"], batch["slot_mask"],
                         frames=batch["frames"], frame_mask=batch["frame_mask"])
        else:
            logits = net(batch["input_ids"], batch["attention_mask"], batch["slot_mask"],
                         batch["word_features"], batch["word_mask"], prefix=prefix)  # (B, T - P, V)
        labels = batch["labels"][:, -logits.shape[1]:]  # the positions the logits are of
        loss, n = lm_loss(logits, labels)  # the response (and its end-of-turn token) only
        return loss * n, n

    settings = {"language": language, "prompt": cfg.prompt, "system": system}
    if visual_sha256:
        settings["visual_sha256"] = visual_sha256

    def save(folder):
        model.save(folder, cpt, vcp, settings, save_visual=model.visual_encoder.save if cfg.full_tune else None)

    fit(model, train_step, dataset, optimizer, cfg, dist, collate_fn=collate, save_fn=save, unit="tokens",
        stage="vlt", evaluate=lambda m: validate(m, tok, system, dev_rows, level, dist, cfg, **dev),
        metric="dev_bleu4")
    dist.log(f"saved {cfg.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
