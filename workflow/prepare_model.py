"""Load the configured base model once and save it as safetensors for every later stage.

    python -m workflow.prepare_model --name-or-path embedded:smollm2-135m-instruct --output results/models/base

Dequantising the embedded GGUF takes ~20 s; every later stage then loads the saved copy in
well under a second. The MLP layout is checked here so an unsupported model fails first.
"""
from __future__ import annotations

import argparse
import json

from workflow.lib.files import atomic_dir, write_json
from workflow.lib.models import PROVENANCE, load_source_model, mlp_output_projections


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name-or-path", required=True)
    p.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model repository's own code (only when the config enables it for this model)")
    a = p.parse_args(argv)

    model, tokenizer = load_source_model(a.name_or_path, trust_remote_code=a.trust_remote_code)
    layers = mlp_output_projections(model)
    info = {"name_or_path": a.name_or_path, "model_type": model.config.model_type,
            "layers": len(layers), "neurons_per_layer": layers[0].n_neurons,
            "mlp_output_projection": layers[0].name.split(".")[-1],
            "parameters": sum(p.numel() for p in model.parameters()),
            "trust_remote_code": a.trust_remote_code}
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / PROVENANCE, info)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
