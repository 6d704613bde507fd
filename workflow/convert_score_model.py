"""Convert a safe-rlhf score model (reward or cost model, e.g. PKU-Alignment/beaver-7b-v1.0-cost) into a
transformers sequence-classification folder that ``workflow.reward_model`` (kind hub) loads.

    python -m workflow.convert_score_model --input PKU-Alignment/beaver-7b-v1.0-cost --output models/beaver-cost

safe-rlhf's ``<Arch>ForScore`` (safe_rlhf/models/score_model/__init__.py, llama/modeling_llama.py) is the
backbone (``model.*`` for Llama) plus ``score_head``, an ``nn.Linear(hidden, score_dim)`` with a bias; the score
of a text (``end_scores``) is score_head(last hidden state) at the last position of the attention mask,
optionally normalised (``do_normalize``: affine (x − mean)/(std + 1e-8), scale x/(std + 1e-8), translate
x − mean) by the ``normalizer`` buffers, or else by the config's ``mean``/``var``. transformers'
``<Arch>ForSequenceClassification`` is the same backbone plus ``score``, a bias-free ``nn.Linear(hidden,
num_labels)`` read at the last non-padding token. So the conversion keeps the backbone's tensors, writes
``score.weight`` = score_head.weight / s (s = std + 1e-8 when the score is scaled, else 1), and keeps the
constant rest, (bias − mean)/s, as ``score_offset`` in config.json, which ``workflow.reward_model`` adds to
every score: the converted score then equals safe-rlhf's ``end_scores``. (Soft labels use score
differences, in which the offset cancels anyway.) ``conversion.json`` records what was done.

The input is a local folder or a hub id (downloaded with huggingface_hub: config, tokenizer, and the
safetensors weights, or the .bin ones when there are none). Weights are converted one shard at a time
(safetensors out), so a 7B model needs about one shard of memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workflow.lib.files import atomic_dir, write_json

# model_type -> the backbone's attribute in both safe-rlhf's <Arch>ForScore and transformers' <Arch>ForSequenceClassification
BACKBONES = {"llama": "model", "mistral": "model", "qwen2": "model", "gemma": "model"}
NORMALIZER_EPS = 1e-8  # safe-rlhf Normalizer.normalize's epsilon
SCALE_FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}  # safe-rlhf init_score_head


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight shards: safetensors if any, else PyTorch .bin files."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"--input {folder}: no *.safetensors or pytorch_model*.bin weights")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # plain tensors only, no code


def head_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """score_head.* and normalizer.* of the checkpoint, wherever they are stored."""
    out = {}
    for path in files:
        shard = read_shard(path)
        out.update({k: v for k, v in shard.items() if k.startswith(("score_head.", "normalizer."))})
    return out


def score_transform(config: dict, head: dict[str, torch.Tensor]) -> tuple[float, float, dict]:
    """(scale s, offset) such that safe-rlhf's end score = (w·x)/s + offset, and a record of the inputs.

    With do_normalize the normalizer's function follows score_type (reward: affine, cost: scale, critic:
    identity); mean and var come from the normalizer buffers when saved, else from the config (as
    safe-rlhf's from_pretrained: config first, then the checkpoint's buffers over it)."""
    bias = float(head["score_head.bias"].reshape(-1)[0]) if "score_head.bias" in head else 0.0
    function = SCALE_FUNCTIONS.get(config.get("score_type", "reward"))
    if function is None:
        raise ValueError(f"score_type {config.get('score_type')!r}: expected reward, cost or critic")
    mean = float(head["normalizer.mean"].reshape(-1)[0]) if "normalizer.mean" in head else float((config.get("mean") or [0.0])[0])
    var = float(head["normalizer.var"].reshape(-1)[0]) if "normalizer.var" in head else float((config.get("var") or [1.0])[0])
    record = {"score_bias": bias, "do_normalize": bool(config.get("do_normalize", False)), "normalize_function": function,
              "mean": mean, "var": var}
    if not record["do_normalize"] or function == "identity":
        return 1.0, bias, record
    std = math.sqrt(var) + NORMALIZER_EPS
    if function == "affine":
        return std, (bias - mean) / std, record
    if function == "scale":
        return std, bias / std, record
    return 1.0, bias - mean, record  # translate


def convert_config(config: dict, offset: float, pad_token_id: int | None) -> dict:
    """config.json of the sequence-classification model: one label, a pad token, and the score offset."""
    model_type = config.get("model_type")
    if model_type not in BACKBONES:
        raise ValueError(f"--input: model_type {model_type!r} is not supported (supported: {sorted(BACKBONES)})")
    out = {k: v for k, v in config.items() if k not in ("score_dim", "score_bias", "score_type", "do_normalize",
                                                         "normalizer_type", "momentum", "mean", "var")}
    arch = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma"}[model_type]
    out.update(architectures=[f"{arch}ForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, score_offset=offset)
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


def convert_shard(shard: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The shard's tensors under transformers' names: backbone unchanged, score_head.weight -> score.weight / s;
    the bias and the normalizer buffers are folded into score_offset."""
    out = {}
    for key, t in shard.items():
        if key == "score_head.weight":
            out["score.weight"] = (t.double() / scale).to(t.dtype).contiguous() if scale != 1.0 else t.contiguous()
        elif not key.startswith(("score_head.", "normalizer.")):
            out[key] = t.contiguous()
    return out


def local_folder(source: str) -> Path:
    """A local folder as given, else a hub snapshot (config, tokenizer, weights; .bin only without safetensors)."""
    if os.path.isdir(os.path.expanduser(source)):
        return Path(os.path.expanduser(source))
    from huggingface_hub import snapshot_download

    text = ["*.json", "*.model", "*.txt", "*.tiktoken"]
    folder = Path(snapshot_download(source, allow_patterns=text + ["*.safetensors"]))
    if not list(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(source, allow_patterns=text + ["pytorch_model*.bin"]))
    return folder


def convert(source: str, output: str) -> dict:
    """Write the converted folder; returns the conversion record (also written as conversion.json)."""
    from transformers import AutoTokenizer

    folder = local_folder(source)
    config = json.loads((folder / "config.json").read_text())
    if int(config.get("score_dim", 1)) != 1:
        raise ValueError(f"--input {source}: score_dim {config['score_dim']}; the reward stage needs one score")
    files = weight_files(folder)
    head = head_tensors(files)
    if "score_head.weight" not in head:
        raise ValueError(f"--input {source}: no score_head.weight; expected a safe-rlhf score model (<Arch>ForScore)")
    scale, offset, record = score_transform(config, head)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    record |= {"source": source, "scale": scale, "score_offset": offset, "pad_token_id": pad,
               "from": "safe-rlhf score_head", "to": "score.weight (transformers sequence classification)"}
    with atomic_dir(output) as tmp:
        weight_map = {}
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for path, name in zip(files, names if len(files) > 1 else ["model.safetensors"]):
            tensors = convert_shard(read_shard(path), scale)
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
        if len(files) > 1:
            write_json(tmp / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
        write_json(tmp / "config.json", convert_config(config, offset, pad))
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "conversion.json", record)
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="safe-rlhf score model: local folder or hub id")
    p.add_argument("--output", required=True, help="folder for the sequence-classification model")
    a = p.parse_args(argv)
    print(json.dumps(convert(a.input, a.output)), flush=True)


if __name__ == "__main__":
    main()
