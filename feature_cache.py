"""The frozen visual encoder's word features, computed once and kept on disk, off the reading
path: a speed trick of train_vlt.py's connector stage (section 3.3 freezes the encoder). What it
buys: the ViT runs over every clip's frames once, not once per epoch, and no video is decoded
while the connector trains.

    fingerprint(vcp_folder, rows, visual_tokens)   what made the features: encoder weights and
                                                   frame settings, the clip list, each video's stamp
    build_cache(path, model, rows, ...)            {clip id: (N, D)} built, or read when still fresh
    CachedVLTDataset, collate_cached               the connector's training examples and batches
"""

import hashlib
import json
import os

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from data import ClipDataset, VideoTransform, build_chat_example, collate_clips, collate_vlt
from hf import file_sha256, read_safetensors, safetensors_metadata
from model import LLaVASLT


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
        config = vcp.config  # how the frames are prepared for this encoder
        dataset = ClipDataset(rows, VideoTransform(config.image_size, config.resize, train=False),
                              max_frames=config.max_frames, stride=config.stride, train=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_clips,
                                             num_workers=num_workers)
        was_training = vcp.training
        vcp.eval()
        features = {}
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

    def __init__(self, rows, features, tok, system, max_length: int = 0):
        self.features = [features[row["id"]] for row in rows]
        self.examples = [build_chat_example(tok, system, len(f), answer=row["text"], max_length=max_length,
                                            clip=row["id"]) for row, f in zip(rows, self.features)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return {"word_features": self.features[i], **self.examples[i]}


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
