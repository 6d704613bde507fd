"""Loads a model for sharded training the way ``train_policy`` and ``sft`` do, for tests/test_fsdp.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_load_worker.py --model DIR --out DIR

Every process records whether the model it got from ``FullyShardedParallel.load_model`` was on the meta
device, whether it then had the weights file mapped (transformers maps an fp32 safetensors file rather than
copying it, so a process holding the weights shows the file in ``/proc/self/maps``), and how far its peak
resident memory grew while loading and sharding it (``ru_maxrss``: everything the process ever held, the
mapped file's pages it read included). Process 0 then writes what the sharded model holds
(its weights gathered, its buffers, its logits on a fixed input, its config and generation config), which
the test compares with the model every process used to load on its own (``models.load_model``).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workflow.lib import models  # noqa: E402
from workflow.lib.parallel import FullyShardedParallel, exit_past_interpreter_shutdown  # noqa: E402


def build_load_model(folder: Path) -> int:
    """A 12-layer Llama of 190 MB in fp32, made of many mid-sized weights (the largest 4 MB): what one process
    holds stands out from the noise of its other allocations, and the one weight the broadcast holds whole at a
    time does not. Returns its bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def peak_rss() -> int:
    """Bytes: the most this process has held in memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def maps_weights() -> bool:
    """Whether this process has a safetensors file mapped into its memory."""
    return ".safetensors" in Path("/proc/self/maps").read_text()


def fixed_input(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    torch.set_num_threads(1)
    parallel = FullyShardedParallel("fp32")
    models.empty_model(a.model)  # imports the model's code first, so only the weights count below
    before = peak_rss()
    model = parallel.load_model(a.model)
    on_meta, mapped = all(p.is_meta for p in model.parameters()), maps_weights()
    parallel.wrap(model)
    grown = peak_rss() - before
    (out / f"rank{parallel.rank}.json").write_text(json.dumps({"on_meta": on_meta, "weights_mapped": mapped,
                                                               "peak_rss_growth": grown}))
    with torch.no_grad():
        logits = model(input_ids=fixed_input(model.config.vocab_size)).logits
    weights = parallel.full_state_dict(model)  # a collective
    if parallel.main:
        torch.save({"weights": {k: v.clone() for k, v in weights.items()}, "logits": logits,
                    "buffers": {k: v.clone() for k, v in model.named_buffers()},
                    "config": model.config.to_dict(), "generation_config": model.generation_config.to_dict()},
                   out / "loaded.pt")
    parallel.close()


if __name__ == "__main__":
    main()
    exit_past_interpreter_shutdown()  # as the training stages end (workflow.lib.parallel)
