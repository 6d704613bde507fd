"""GPU figures on a randomly initialised model with a real architecture (default: Llama-3.2-1B's config).

    python bench/gpu_step_time.py [--arch llama-3.2-1b] [--batch-size 8] [--seq 512] [--steps 11] \
        [--peak-tflops 989] [--out results/bench/gpu_step_time.json]

Sharded training (``training.parallel: fsdp``), one process per GPU, e.g. a 7B model on 4 GPUs::

    python -m torch.distributed.run --standalone --nproc_per_node 4 bench/gpu_step_time.py --parallel fsdp \
        --arch qwen2.5-7b --batch-size 16 --seq 512 --out results/bench/gpu_step_time_fsdp.json

The fsdp mode reports the same step times with the peak GPU memory of every process (the most loaded
one first), skips generation (the model is sharded; generation runs on one GPU, see ddp mode), and sets
the reference log-probs to zero (they shift the loss, not the work). Every process builds the same
seeded random model in host memory before sharding it: about 4 bytes x parameters per process.

Seconds per optimizer step for DPO and ShaPO at interval 1 and 5 (the workflow's own ``train``,
bf16 autocast), their ratios, training tokens/s and model FLOPs utilisation
(6·params·tokens per forward/backward pass, two passes on a sharpness-aware step, over the
device's peak bf16 FLOP/s), generation tokens/s (batch 16, 128 new tokens) and peak GPU memory.
Nothing is downloaded: the architecture is written out below and the tokenizer is the embedded
SmolLM2 one (its ids fit in the larger vocabulary). Without a GPU it runs on the CPU in fp32 —
only useful as a smoke check, e.g. ``--arch smoke --seq 64 --batch-size 2 --steps 3``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {  # published configs (hub config.json), so no download is needed
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    # a CPU smoke check: Llama layout at toy size (the embedded tokenizer's 49,152 ids)
    "smoke": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0,
                  max_position_embeddings=512, rms_norm_eps=1e-5),
    # Qwen2.5-7B (the paper's largest backbone): Llama's layout plus q/k/v biases, untied embeddings
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                       rope_theta=1000000.0, max_position_embeddings=131072, rms_norm_eps=1e-6),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense
SHAPO = {"subspace": "probe", "perturbation": "raw", "gamma_min": 2e-6, "gamma_max": 4e-6}
VARIANTS = {
    "dpo": {"loss": "dpo", "beta": 0.1},
    "shapo_interval5": {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5, **SHAPO}},
    "shapo_interval1": {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 1, **SHAPO}},
}


def random_model(arch: str, layers: int | None, tokenizer):
    """The architecture with seeded random weights (the same on every process, as FSDP needs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch], num_hidden_layers=layers or ARCHS[arch]["num_hidden_layers"])
    config = AutoConfig.for_model(spec.pop("model_type", "llama"), **spec, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def synthetic_pairs(tokenizer, n: int, seq: int, seed: int = 0) -> list[dict]:
    """Pairs of random-token texts long enough to fill ``seq`` tokens after truncation."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(len(tokenizer), 49152)

    def text(k):
        return tokenizer.decode(torch.randint(1000, vocab, (k,), generator=g).tolist())

    return [{"pair_id": f"s{i}", "messages": [{"role": "user", "content": text(seq // 2)}],
             "chosen": text(seq // 2), "rejected": text(seq // 2), "flipped": False} for i in range(n)]


def one_percent_neurons(model, seed: int = 0):
    """A ShaPO budget without a probe: 1% of every layer's MLP output neurons, drawn at random."""
    from workflow.lib.models import mlp_output_projections
    from workflow.lib.sharpness import SelectedNeurons

    g = torch.Generator().manual_seed(seed)
    return [SelectedNeurons(l.weight, torch.randperm(l.n_neurons, generator=g)[: max(1, l.n_neurons // 100)]
                            .to(l.weight.device), l.axis) for l in mlp_output_projections(model)]


def peak_flops(a, device: str) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_figures(log: list[dict], a, params: int, flops: float | None, processes: int = 1) -> dict:
    """Time per step (the first step, warm-up, left out), training tokens/s and MFU of one variant's log:
    tokens are chosen + rejected sequences at the padded length (an upper bound), a sharpness-aware step
    counts two forward/backward passes, and MFU is over the peak of all ``processes``."""
    timed = log[1:]
    seconds = sum(r["seconds"] for r in timed)
    passes = sum(2 if r["sharpness_step"] else 1 for r in timed)
    tokens = 2 * a.batch_size * a.seq * len(timed)
    return {"median_s_per_step": statistics.median(r["seconds"] for r in timed),
            "mean_s_per_step": seconds / len(timed), "train_tokens_per_s": tokens / seconds,
            "mfu": 6 * params * 2 * a.batch_size * a.seq * passes / seconds / (flops * processes) if flops else None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama-3.2-1b", choices=sorted(ARCHS))
    p.add_argument("--layers", type=int, help="fewer layers than the architecture (smoke checks)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--seq", type=int, default=512, help="tokens per prompt + answer")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps per variant (the first is not timed)")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, help="the device's peak bf16 TFLOP/s (default: looked up by name)")
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="training.parallel: fsdp shards the model over the processes torchrun starts")
    p.add_argument("--out", default="results/bench/gpu_step_time.json")
    a = p.parse_args(argv)
    if a.parallel == "fsdp":
        return main_fsdp(a)

    from transformers import AutoTokenizer

    from workflow.lib.files import write_json
    from workflow.lib.models import embedded_gguf
    from workflow.lib.pairs import score_pairs
    from workflow.lib.config import fill_defaults
    from workflow.lib.parallel import DataParallel
    from workflow.train_policy import attach_reference, train

    gguf_dir, gguf_file = embedded_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    parallel = DataParallel("auto")
    device = parallel.device.type
    settings = fill_defaults({"batch_size": a.batch_size, "epochs": 1, "lr": 1e-6, "warmup_ratio": 0.0,
                              "max_length": a.seq, "max_prompt_length": a.seq // 2}, "training") | {"prompt_format": "auto"}
    records = synthetic_pairs(tokenizer, a.steps * a.batch_size, a.seq)
    model = random_model(a.arch, a.layers, tokenizer).to(parallel.device)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), parallel.autocast():
        attach_reference(records, score_pairs(model.eval(), tokenizer, records, settings), "synthetic")
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flops = peak_flops(a, device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "arch": a.arch,
              "layers": model.config.num_hidden_layers, "params": params, "precision": "bf16" if parallel.bf16 else "fp32",
              "batch_pairs": a.batch_size, "seq": a.seq, "variants": {}}
    for name, method in VARIANTS.items():
        model.load_state_dict(initial)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        selected = one_percent_neurons(model) if "sharpness" in method else None
        log = train(model, tokenizer, records, fill_defaults(method, "presets/*"), settings, seed=0, selected=selected,
                    parallel=parallel)
        row = step_figures(log, a, params, flops) | {
            "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    dpo = result["variants"]["dpo"]["mean_s_per_step"]
    for name, row in result["variants"].items():
        row["ratio_to_dpo"] = row["mean_s_per_step"] / dpo

    model.eval()
    dtype = torch.bfloat16 if parallel.bf16 else torch.float32
    gen = model.to(dtype)
    tokenizer.padding_side = "left"
    prompts = [r["messages"][0]["content"] for r in records[: a.gen_batch]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=a.seq // 2).to(parallel.device)
    kwargs = dict(max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        gen.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen.generate(**enc, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    result["generation_tokens_per_s"] = a.gen_batch * a.gen_tokens / (time.perf_counter() - t0)
    print(json.dumps(result, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, result)


def main_fsdp(a):
    """Seconds per step and peak GPU memory per process of sharded training (training.parallel: fsdp)."""
    import gc

    from transformers import AutoTokenizer

    from workflow.lib.config import fill_defaults
    from workflow.lib.files import write_json
    from workflow.lib.models import embedded_gguf
    from workflow.lib.parallel import FullyShardedParallel
    from workflow.train_policy import train

    gguf_dir, gguf_file = embedded_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    parallel = FullyShardedParallel("auto")
    device = parallel.device.type
    settings = fill_defaults({"batch_size": a.batch_size, "epochs": 1, "lr": 1e-6, "warmup_ratio": 0.0,
                              "max_length": a.seq, "max_prompt_length": a.seq // 2, "parallel": "fsdp",
                              "devices": parallel.world}, "training") | {"prompt_format": "auto"}
    records = [r | {"ref_chosen": 0.0, "ref_rejected": 0.0} for r in synthetic_pairs(tokenizer, a.steps * a.batch_size, a.seq)]
    flops = peak_flops(a, device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "arch": a.arch, "parallel": "fsdp",
              "processes": parallel.world, "precision": "bf16 params, fp32 reduce and master" if parallel.bf16 else "fp32",
              "batch_pairs": a.batch_size, "seq": a.seq, "variants": {}}
    for name, method in VARIANTS.items():
        model = random_model(a.arch, a.layers, tokenizer)
        result.update(layers=model.config.num_hidden_layers, params=sum(p.numel() for p in model.parameters()))
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        selected = one_percent_neurons(model) if "sharpness" in method else None
        log = train(model, tokenizer, records, fill_defaults(method, "presets/*"), settings, seed=0, selected=selected,
                    parallel=parallel)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        peaks = [parallel.all_max(torch.tensor(peak if r == parallel.rank else 0.0, device=parallel.device)).item()
                 for r in range(parallel.world)]
        row = step_figures(log, a, result["params"], flops, parallel.world) | {
            "peak_gpu_mem_gb_per_process": peaks if device == "cuda" else None}
        result["variants"][name] = row
        if parallel.main:
            print(name, json.dumps(row), flush=True)
        del model, selected
        gc.collect()
    dpo = result["variants"]["dpo"]["mean_s_per_step"]
    for row in result["variants"].values():
        row["ratio_to_dpo"] = row["mean_s_per_step"] / dpo
    parallel.close()
    if parallel.main:
        print(json.dumps(result, indent=1))
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, result)


if __name__ == "__main__":
    main()
