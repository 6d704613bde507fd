import pytest
import torch

from workflow.lib.models import ModelError, mlp_output_projections
from workflow.select_subspace import cosine_scores, select_top_percent


def test_cosine_scores_on_a_hand_made_matrix():
    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    scores = cosine_scores(vectors, torch.tensor([1.0, 0.0]))
    assert torch.allclose(scores, torch.tensor([1.0, 0.0, -1.0, 2 ** -0.5]))


def test_ranking_across_layers_in_each_direction():
    layer0 = torch.tensor([0.9, -0.8, 0.1, 0.0])
    layer1 = torch.tensor([-0.95, 0.2, 0.7, -0.1])
    scores = [layer0, layer1]
    # 25% of 8 neurons = 2, ranked over both layers together
    neg = select_top_percent(scores, 25, "negative")
    assert [t.tolist() for t in neg] == [[1], [0]]
    pos = select_top_percent(scores, 25, "positive")
    assert [t.tolist() for t in pos] == [[0], [2]]
    ab = select_top_percent(scores, 25, "absolute")
    assert [t.tolist() for t in ab] == [[0], [0]]
    assert sum(len(t) for t in select_top_percent(scores, 100, "negative")) == 8


def test_at_least_one_neuron_is_kept():
    assert sum(len(t) for t in select_top_percent([torch.randn(50)], 0.1, "negative")) == 1


@pytest.mark.parametrize("percent", [0, -1, 100.5])
def test_percent_out_of_range(percent):
    with pytest.raises(ValueError, match="subspace.percent"):
        select_top_percent([torch.randn(10)], percent, "negative")


def tiny(config_cls, model_cls, **kwargs):
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs))


def test_llama_down_proj_columns_are_neuron_output_vectors():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny(LlamaConfig, LlamaForCausalLM, vocab_size=64, hidden_size=16, intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    layers = mlp_output_projections(model)
    assert [l.name for l in layers] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert layers[0].n_neurons == 24
    # neuron 5's output vector = what down_proj writes when only neuron 5 is active
    onehot = torch.zeros(24)
    onehot[5] = 1.0
    written = model.model.layers[0].mlp.down_proj(onehot)
    assert torch.allclose(layers[0].output_vectors()[5], written.detach())


def test_gpt_neox_and_gpt2_layouts():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    neox = tiny(GPTNeoXConfig, GPTNeoXForCausalLM, vocab_size=64, hidden_size=16, intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=2)
    layers = mlp_output_projections(neox)
    assert layers[0].name.endswith("mlp.dense_4h_to_h") and layers[0].output_vectors().shape == (32, 16)
    gpt2 = tiny(GPT2Config, GPT2LMHeadModel, vocab_size=64, n_embd=16, n_layer=2, n_head=2)
    layers = mlp_output_projections(gpt2)
    assert [l.name for l in layers] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    onehot = torch.zeros(64)
    onehot[3] = 1.0
    written = gpt2.transformer.h[0].mlp.c_proj(onehot) - gpt2.transformer.h[0].mlp.c_proj.bias
    assert torch.allclose(layers[0].output_vectors()[3], written.detach())


def test_unsupported_mlp_layout_names_the_model():
    from transformers import OPTConfig, OPTForCausalLM

    model = tiny(OPTConfig, OPTForCausalLM, vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                 num_attention_heads=2, word_embed_proj_dim=16)
    with pytest.raises(ModelError, match="'opt'.*no supported MLP output projection"):
        mlp_output_projections(model)
