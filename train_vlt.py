"""Stage 3, visual language tuning (paper section 3.3, Tab. 8, Tab. F/G).

The LLM (from CPT) and the visual encoder (from VCP) are frozen; a 2-layer MLP connector maps
the word-level visual tokens into the LLM's embedding space, where they fill the user turn of
a chat prompt whose system turn carries the task and format prompts. The loss is the LM loss
on the response only. Since both encoders are frozen, the word features are computed once
and cached on disk (feature_cache.py). An optional second pass (`--full_tune=true`, lr 1e-5)
unfreezes the visual encoder and puts LoRA on the LLM; it reads the videos again (no cache).

    torchrun --nproc_per_node 8 train_vlt.py --data=CSL-Daily --cpt=out/cpt --vcp=out/vcp --out=out/vlt
    torchrun --nproc_per_node 8 train_vlt.py --data=CSL-Daily --init=out/vlt --full_tune=true --out=out/vlt_full

Ablations (Tab. 8): --connector=linear, --visual_tokens=sentence, --prompt=no_format|none.
"""

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from checkpoint import check_out
from cli import cli, parse_config, setup_distributed
from data import (ClipDataset, VideoTransform, build_chat_example, chat_prefix_ids, collate_clips, collate_vlt,
                  system_prompt)
from errors import UserError
from eval import EvalConfig, score, translate
from feature_cache import CachedVLTDataset, build_cache, collate_cached, fingerprint, pad_features
from hf import checkpoint_folder, file_sha256, read_json
from loader import loader_workers
from losses import lm_loss
from model import LLM, Connector, LLaVASLT, PrefixCache, apply_lora
from readers import language_of, load_rows
from tokenizer import Tokenizer
from training import TrainConfig, fit, make_optimizer, parameter_counts, seed_everything, trainable_in_fp32
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
    # optimisation (paper: batch 64, AdamW wd 1e-3, max lr 1e-3, one-cycle cosine; full-tuning: lr 1e-5)
    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None       # default: 1e-3, or 1e-5 with --full_tune=true
    weight_decay: float = 1e-3

    def __post_init__(self):
        if self.lr is None:
            self.lr = 1e-5 if self.full_tune else 1e-3
        super().__post_init__()


def prompt_system(config: VLTConfig, language: str) -> str:
    if config.prompt not in ("full", "no_format", "none"):
        raise UserError(f"--prompt={config.prompt}: expected full, no_format or none")
    return system_prompt(language, task=config.prompt != "none", format=config.prompt == "full")


class VideoVLTDataset(torch.utils.data.Dataset):
    """Frames (for full-tuning) + the chat example; the slot count follows from the frame count."""

    def __init__(self, clips: ClipDataset, tok, system, n_tokens, max_length: int = 0):
        self.clips, self.tok, self.system, self.n_tokens, self.max_length = clips, tok, system, n_tokens, max_length

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
        return {**clip, **build_chat_example(self.tok, self.system, n, answer=clip["text"],
                                             max_length=self.max_length, clip=clip["id"])}


def collate_video(items, pad_id):
    return {**collate_vlt(items, pad_id), **collate_clips(items)}


@torch.no_grad()
def validate(model: LLaVASLT, tok, system, rows, level, dist, config, features=None, clips=None) -> dict:
    """Dev BLEU-4 and ROUGE-L with greedy decoding (the paper trains "until validation performance
    stops improving"), scored as eval.py scores. Each rank translates every world_size-th clip
    (cached features, or frames through the tuned encoder); all ranks score all of them alike."""
    greedy = EvalConfig(num_beams=1, max_new_tokens=config.eval_max_new_tokens)
    mine, hyps = list(range(dist.rank, len(rows), dist.world_size)), {}
    for i in range(0, len(mine), config.batch_size):
        part = mine[i:i + config.batch_size]
        if features is not None:
            feats, mask = pad_features([features[rows[j]["id"]] for j in part])
            batch = {"ids": [rows[j]["id"] for j in part], "word_features": feats, "word_mask": mask}
        else:
            batch = collate_clips([clips[j] for j in part])
        hyps.update(zip(part, translate(model, tok, system, batch, greedy, dist.device)))
    if dist.ddp:
        every = [None] * dist.world_size
        torch.distributed.all_gather_object(every, hyps)
        hyps = {k: v for d in every for k, v in d.items()}
    scores = score([hyps[i] for i in range(len(rows))], [r["text"] for r in rows], level)
    return {"dev_bleu4": scores["bleu4"], "dev_rouge": scores["rouge"]}


def build_model(config: VLTConfig, dtype) -> tuple:
    """(model, cpt, vcp): a previous LLaVA-SLT folder (--init, with its LLM and encoder folders),
    or the CPT LLM + the VCP encoder + a fresh connector."""
    if config.init:
        model = LLaVASLT.load(config.init, VCPModel.load, dtype=dtype)
        cpt, vcp = model.config["llm"], model.config["visual"]
        check_out(config.out, "vlt", **{"init's LLM": cpt, "init's visual encoder": vcp})
        if model.visual_tokens != config.visual_tokens:
            raise UserError(f"--visual_tokens={config.visual_tokens} but {config.init} was trained with "
                            f"{model.visual_tokens}")
        return model, cpt, vcp
    if not config.cpt or not config.vcp:
        raise UserError("give --cpt (an LLM folder) and --vcp (a visual encoder folder), or --init")
    llm = LLM.from_pretrained(config.cpt, dtype=dtype)
    visual = VCPModel.load(config.vcp)
    if config.visual_tokens == "sentence" and visual.config.hier.full_layers < 2:  # penultimate = the word features
        raise UserError(f"--visual_tokens=sentence takes the full-attention transformer's penultimate layer, but "
                        f"{config.vcp} has {visual.config.hier.full_layers} full layer(s): that is the word features "
                        "themselves; train VCP with --full_layers >= 2")
    connector = Connector(visual.config.hier.dim, llm.config.hidden_size, config.connector)
    return LLaVASLT(llm, connector, visual, config.visual_tokens), config.cpt, config.vcp


def encoder_sha256(config: VLTConfig, vcp: str) -> str:
    """The encoder's weights hash, checked by eval, --init and --resume: the connector fits this encoder only."""
    sha256 = file_sha256(os.path.join(checkpoint_folder(vcp), "model.safetensors"))
    saved = os.path.join(checkpoint_folder(config.out), "config.json")
    if config.resume and os.path.isfile(saved) and read_json(saved).get("visual_sha256") not in (None, sha256):
        raise UserError(f"--resume: {config.out} was trained on another visual encoder than {vcp} holds now "
                        "(another sha256); start a new --out, or restore that encoder")
    return sha256


def set_trainable(model: LLaVASLT, config: VLTConfig):
    """The connector trains. Full-tuning (section 3.3: "we unfreeze the visual encoder and LLM
    (LoRA if used)") trains the encoder's path to the visual tokens and LoRA; the CLIP heads stay frozen."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if not config.full_tune:
        return
    # word tokens leave the hierarchical encoder before its full-attention part; the
    # sentence-level ablation's leave it before its last layer: train what is on the path
    on_path = ("hier.input_proj.", "hier.local.")
    if config.visual_tokens == "sentence":
        on_path += ("hier.query",) + tuple(f"hier.full.layers.{i}."
                                           for i in range(model.visual_encoder.config.hier.full_layers - 1))
    apply_lora(model.llm, tuple(config.lora_targets.split(",")), config.lora_r, config.lora_alpha)
    for name, p in model.visual_encoder.named_parameters():
        p.requires_grad_(name.startswith(on_path + ("frame_proj.",)) or ".lora_" in name
                         or (model.visual_encoder.config.vit_tuning == "full" and name.startswith("vit.")
                             and "mask_token" not in name))


def video_data(config: VLTConfig, vc, rows, dev_rows, tok, system, max_length: int) -> tuple:
    """Full-tuning: (dataset, collate, dev) of frames, prepared as the encoder's config `vc` says;
    one visual token per downsampled frame position (word or sentence level)."""
    clips = ClipDataset(rows, VideoTransform(vc.image_size, vc.resize, train=config.augment),
                        max_frames=vc.max_frames, stride=vc.stride, train=True, seed=config.seed,
                        cache_videos=config.cache_videos)
    dataset = VideoVLTDataset(clips, tok, system, lambda T: math.ceil(T / vc.hier.step), max_length)
    dev = dict(clips=ClipDataset(dev_rows, VideoTransform(vc.image_size, vc.resize, train=False),
                                 max_frames=vc.max_frames, stride=vc.stride, train=False))
    return dataset, lambda items: collate_video(items, tok.pad_token_id), dev


def cached_data(config: VLTConfig, model, rows, dev_rows, tok, system, vcp, visual_sha256, cache_dir, dist) -> tuple:
    """The connector stage: (dataset, collate, dev) of the frozen encoder's word features,
    computed once into `cache_dir` (feature_cache.py)."""
    model.visual_encoder.to(dist.device)
    workers, vcp_read = loader_workers(config.num_workers, dist.device), checkpoint_folder(vcp)

    def features(split, split_rows):
        path = os.path.join(cache_dir, f"{split}-{config.visual_tokens}.safetensors")
        key = fingerprint(vcp_read, split_rows, config.visual_tokens, visual_sha256)
        return build_cache(path, model, split_rows, dist, config.batch_size, workers, key)
    dataset = CachedVLTDataset(rows, features(config.split, rows), tok, system,
                               model.llm.config.max_position_embeddings)
    dev = dict(features=features(config.dev_split, dev_rows) if dev_rows else {})
    return dataset, lambda items: collate_cached(items, tok.pad_token_id), dev


def main(argv):
    config = parse_config(VLTConfig, argv)
    if not config.data:
        raise UserError("--data is required: a manifest folder, a Phoenix-2014T root or a CSL-Daily root")
    if config.visual_tokens not in ("word", "sentence"):
        raise UserError(f"--visual_tokens={config.visual_tokens}: expected word or sentence")
    cache_dir = config.cache or os.path.normpath(config.out) + "_cache"
    check_out(config.out, "vlt", data=config.data, cpt=config.cpt, vcp=config.vcp, init=config.init, cache=cache_dir)
    dist = setup_distributed(config.device)
    seed_everything(config.seed)
    rows = load_rows(config.data, config.split)
    dev_rows = load_rows(config.data, config.dev_split) if config.eval_every else []
    language, level = language_of(config.data)
    system = prompt_system(config, language)

    model, cpt, vcp = build_model(config, getattr(torch, config.dtype))
    visual_sha256 = None if config.full_tune else encoder_sha256(config, vcp)
    tok = Tokenizer.from_pretrained(cpt)
    tok.check_fits(model.llm.config.vocab_size, cpt)
    set_trainable(model, config)
    if config.full_tune:  # frames through the encoder that trains
        dataset, collate, dev = video_data(config, model.visual_encoder.config, rows, dev_rows, tok, system,
                                           model.llm.config.max_position_embeddings)
    else:
        dataset, collate, dev = cached_data(config, model, rows, dev_rows, tok, system, vcp, visual_sha256,
                                            cache_dir, dist)
        model.visual_encoder = None  # not needed while training on the cache; saved by path
    dist.log(f"{len(rows)} clips ({language}); {'full-tune' if config.full_tune else 'connector'}")
    dist.log(parameter_counts(model, {"connector": "connector.", "LLM": "llm.", "ViT": "visual_encoder.vit.",
                                      "local": "visual_encoder.hier.local.", "full": "visual_encoder.hier.full.",
                                      "visual encoder": "visual_encoder."}))
    trainable_in_fp32(model)  # the connector (and LoRA, the tuned encoder) in fp32 beside a bf16 LLM
    optimizer = make_optimizer(model, config.lr, config.weight_decay)

    # Every prompt starts with the same system turn and user header; with the LLM frozen, their keys
    # and values are computed once (PrefixCache), not in every step: about half of a prompt's positions.
    model.to(dist.device)
    prefix_ids = chat_prefix_ids(tok, system)
    prefix = PrefixCache(model.llm, prefix_ids) if prefix_ids and not config.full_tune else None

    def train_step(net, batch):  # net: the model, or its DDP wrapper under torchrun
        if config.full_tune:
            logits = net(batch["input_ids"], batch["attention_mask"], batch["slot_mask"],
                         frames=batch["frames"], frame_mask=batch["frame_mask"])
        else:
            logits = net(batch["input_ids"], batch["attention_mask"], batch["slot_mask"],
                         batch["word_features"], batch["word_mask"], prefix=prefix)  # (B, T - P, V)
        labels = batch["labels"][:, -logits.shape[1]:]  # the positions the logits are of
        loss, n = lm_loss(logits, labels)  # the response (and its end-of-turn token) only
        return loss * n, n

    settings = {"language": language, "prompt": config.prompt, "system": system}
    if visual_sha256:
        settings["visual_sha256"] = visual_sha256

    def save(folder):
        model.save(folder, cpt, vcp, settings, save_visual=model.visual_encoder.save if config.full_tune else None)

    fit(model, train_step, dataset, optimizer, config, dist, collate_fn=collate, save_fn=save, unit="tokens",
        stage="vlt", evaluate=lambda m: validate(m, tok, system, dev_rows, level, dist, config, **dev),
        metric="dev_bleu4")
    dist.log(f"saved {config.out}")


if __name__ == "__main__":
    cli(main, sys.argv[1:])
